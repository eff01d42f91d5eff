#!/usr/bin/python3
# SMTP clients for tests/component/test_listen.c: Python's smtplib for the
# well-behaved cases, raw sockets for the hostile ones. Usage:
#   listen_client.py CASE PORT [ARGS...]
# Prints what the server said, one reply line a line ("S: ..."), and the
# case's own results ("R: ..."). Exit 0 unless the client itself broke.
import smtplib
import socket
import ssl
import sys
import time
import base64
import codecs

case, port = sys.argv[1], int(sys.argv[2])
args = sys.argv[3:]


def out(prefix, s):
    sys.stdout.write(prefix + s + "\n")
    sys.stdout.flush()


def read_all(sock, quiet=2.0):
    """Reads until EOF or `quiet` seconds without bytes."""
    sock.settimeout(quiet)
    data = b""
    while True:
        try:
            b = sock.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            break
        if not b:
            break
        data += b
    return data


def show(data):
    for line in data.split(b"\r\n"):
        if line:
            out("S: ", line.decode("latin-1"))


def unesc(s):
    return codecs.decode(s, "unicode_escape").encode("latin-1")


def reply(f):
    """One whole reply from a file object: (code, text of the last line)."""
    while True:
        line = f.readline()
        if not line:
            return (0, "")
        out("S: ", line.decode("latin-1").rstrip("\r\n"))
        if len(line) < 4 or line[3:4] != b"-":
            return (int(line[:3]), line.decode("latin-1"))


if case == "raw":
    # raw PORT PAYLOAD [PAYLOAD2 ...]: each payload (Python escapes) sent
    # as it is, 0.2 s apart; then everything the server says until it closes
    s = socket.create_connection(("127.0.0.1", port))
    for i, p in enumerate(args):
        if i:
            time.sleep(0.2)
        s.sendall(unesc(p))
    show(read_all(s))
    s.close()

elif case == "longline":
    # a command line of 1 MiB, then NOOP and QUIT
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"EHLO client.test\r\n" + b"A" * (1 << 20) + b"\r\nNOOP\r\nQUIT\r\n")
    show(read_all(s))

elif case == "smtplib":
    # smtplib PORT FROM TO[,TO...] MESSAGE [MAIL-OPTIONS...]: one message
    frm, to, msg = args[0], args[1].split(","), unesc(args[2])
    opts = args[3:]
    c = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=20)
    c.ehlo()
    out("R: ", "esmtp=" + " ".join(sorted(c.esmtp_features.keys())))
    code, text = c.mail(frm, opts)
    out("R: ", "mail %d" % code)
    for t in to:
        code, text = c.rcpt(t)
        out("R: ", "rcpt %d" % code)
    code, text = c.data(msg)
    out("R: ", "data %d %s" % (code, text.decode()))
    c.quit()

elif case == "two":
    # two messages on one connection: the second with an SMTPUTF8 sender and
    # an 8-bit body
    c = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=20)
    c.ehlo()
    c.mail("one@example.com")
    c.rcpt("r1@example.net")
    code, text = c.data(b"Subject: one\r\n\r\nfirst\r\n")
    out("R: ", "data %d %s" % (code, text.decode()))
    c.mail("j\u00f6rg@example.com", ["SMTPUTF8", "BODY=8BITMIME"])
    c.rcpt("r2@example.net")
    c.rcpt("r3@example.net")
    code, text = c.data("Subject: two\r\n\r\nGr\u00fc\u00dfe\r\n.dot\r\n".encode("utf-8"))
    out("R: ", "data %d %s" % (code, text.decode()))
    c.quit()

elif case == "starttls_inject":
    # STARTTLS with a MAIL pipelined behind it in the same packet: that MAIL
    # must never count as said under TLS
    s = socket.create_connection(("127.0.0.1", port))
    f = s.makefile("rb")
    reply(f)
    s.sendall(b"EHLO client.test\r\n")
    reply(f)
    s.sendall(b"STARTTLS\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<x@example.net>\r\n")
    code, _ = reply(f)
    out("R: ", "starttls %d" % code)
    ctx = ssl._create_unverified_context()
    t = ctx.wrap_socket(s, server_hostname="localhost")
    tf = t.makefile("rb")
    t.sendall(b"RCPT TO:<y@example.net>\r\n")
    code, _ = reply(tf)
    out("R: ", "rcpt-after-tls %d" % code)
    t.sendall(b"EHLO client.test\r\n")
    code, _ = reply(tf)
    out("R: ", "ehlo %d" % code)
    t.sendall(b"QUIT\r\n")
    reply(tf)

elif case == "auth":
    # auth PORT TLS(0/1) MECH USER PASSWORD [MECH USER PASSWORD ...]: after
    # EHLO (and STARTTLS), each AUTH in turn; prints the code and the time
    # its reply took
    tls = args[0] == "1"
    s = socket.create_connection(("127.0.0.1", port))
    f = s.makefile("rb")
    reply(f)
    s.sendall(b"EHLO client.test\r\n")
    reply(f)
    if tls:
        s.sendall(b"STARTTLS\r\n")
        reply(f)
        s = ssl._create_unverified_context().wrap_socket(s, server_hostname="localhost")
        f = s.makefile("rb")
        s.sendall(b"EHLO client.test\r\n")
        reply(f)
    rest = args[1:]
    for i in range(0, len(rest) - 2, 3):
        mech, user, pw = rest[i], rest[i + 1], rest[i + 2]
        t0 = time.time()
        if mech == "PLAIN":
            tok = base64.b64encode(b"\0" + user.encode() + b"\0" + pw.encode())
            s.sendall(b"AUTH PLAIN " + tok + b"\r\n")
            code, _ = reply(f)
        else:
            s.sendall(b"AUTH LOGIN\r\n")
            code, _ = reply(f)
            if code == 334:
                s.sendall(base64.b64encode(user.encode()) + b"\r\n")
                code, _ = reply(f)
            if code == 334:
                s.sendall(base64.b64encode(pw.encode()) + b"\r\n")
                code, _ = reply(f)
        out("R: ", "auth %s %d %.2f" % (mech, code, time.time() - t0))
        if code == 0 or code == 421:
            break
    s.sendall(b"MAIL FROM:<a@example.com>\r\n")
    code, _ = reply(f)
    out("R: ", "mail %d" % code)
    s.sendall(b"QUIT\r\n")
    reply(f)

elif case == "conns":
    # conns PORT N: N connections at once; the first line each got
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(int(args[0]))]
    for i, s in enumerate(socks):
        s.settimeout(5)
        line = s.makefile("rb").readline().decode("latin-1").rstrip("\r\n")
        out("R: ", "conn%d %s" % (i, line))
    for s in socks:
        s.close()

elif case == "hold":
    # hold PORT SECONDS PAYLOAD: sends PAYLOAD, prints what comes for
    # SECONDS (or until the server closes)
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(unesc(args[1]))
    show(read_all(s, float(args[0])))

elif case == "authmany":
    # authmany PORT N USER PASSWORD: N connections (AUTH in clear allowed),
    # each sends AUTH PLAIN at once; then every reply is read, in order
    n, user, pw = int(args[0]), args[1], args[2]
    tok = base64.b64encode(b"\0" + user.encode() + b"\0" + pw.encode())
    conns = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        f = s.makefile("rb")
        reply(f)
        s.sendall(b"EHLO client.test\r\n")
        reply(f)
        conns.append((s, f))
    for s, f in conns:
        s.sendall(b"AUTH PLAIN " + tok + b"\r\nNOOP\r\n")
    for i, (s, f) in enumerate(conns):
        s.settimeout(60)
        code, _ = reply(f)
        out("R: ", "auth%d %d" % (i, code))
        code, _ = reply(f)
        out("R: ", "noop%d %d" % (i, code))
        s.sendall(b"QUIT\r\n")
        reply(f)
        s.close()

elif case == "fire":
    # fire PORT PAYLOAD: sends PAYLOAD and closes without reading
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(unesc(args[0]))
    time.sleep(0.2)
    s.close()

elif case == "ssl":
    # ssl PORT CAFILE FROM TO MESSAGE: SMTP_SSL (implicit TLS) verifying the
    # certificate against CAFILE for "localhost"
    ctx = ssl.create_default_context(cafile=args[0])
    c = smtplib.SMTP_SSL("localhost", port, local_hostname="client.test", timeout=20,
                         context=ctx)
    out("R: ", "tls " + c.sock.version())
    c.ehlo()
    out("R: ", "esmtp=" + " ".join(sorted(c.esmtp_features.keys())))
    code, _ = c.mail(args[1])
    out("R: ", "mail %d" % code)
    code, _ = c.rcpt(args[2])
    out("R: ", "rcpt %d" % code)
    code, text = c.data(unesc(args[3]))
    out("R: ", "data %d %s" % (code, text.decode()))
    c.quit()

elif case == "sslconns":
    # sslconns PORT CAFILE N: N implicit-TLS connections at once (verified);
    # the first line each got, or how it ended
    ctx = ssl.create_default_context(cafile=args[0])
    socks = []
    for i in range(int(args[1])):
        raw = socket.create_connection(("127.0.0.1", port))
        raw.settimeout(20)
        socks.append(ctx.wrap_socket(raw, server_hostname="localhost"))
    for i, s in enumerate(socks):
        try:
            line = s.makefile("rb").readline().decode("latin-1").rstrip("\r\n")
        except (OSError, ssl.SSLError) as e:
            line = "error " + type(e).__name__
        out("R: ", "conn%d %s" % (i, line or "closed"))
    for s in socks:
        s.close()

elif case == "manyrcpt":
    # manyrcpt PORT N: one transaction with N recipients, pipelined in one
    # write while a thread reads; counts the replies to the RCPTs
    import threading
    n = int(args[0])
    s = socket.create_connection(("127.0.0.1", port))
    buf = bytearray()
    def rd():
        s.settimeout(60)
        while True:
            try:
                b = s.recv(65536)
            except OSError:
                return
            if not b:
                return
            buf.extend(b)
    t = threading.Thread(target=rd)
    t.start()
    cmds = [b"EHLO client.test", b"MAIL FROM:<a@example.com>"]
    cmds += [b"RCPT TO:<r%d@example.net>" % i for i in range(n)]
    cmds += [b"DATA"]
    s.sendall(b"\r\n".join(cmds) + b"\r\n")
    # the body after the 354 (PIPELINING stops at DATA)
    while b"\r\n354 " not in buf:
        time.sleep(0.05)
        if not t.is_alive():
            break
    s.sendall(b"Subject: many\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    t.join()
    lines = bytes(buf).decode("latin-1").split("\r\n")
    # greeting, EHLO (multi-line), MAIL, N RCPT, DATA, final, QUIT
    ehlo_end = next(i for i, l in enumerate(lines) if l.startswith("250 "))
    r = [l for l in lines[ehlo_end + 2:ehlo_end + 2 + n]]
    out("R: ", "rcpt-250 %d" % sum(1 for l in r if l.startswith("250 2.1.5")))
    out("R: ", "rcpt-452 %d" % sum(1 for l in r if l.startswith("452 4.5.3")))
    for l in lines[ehlo_end + 2 + n:]:
        if l:
            out("S: ", l)

elif case == "slow":
    # slow PORT LINE: after the greeting, LINE one byte a second until the
    # server closes; prints what it said and how many bytes went out
    s = socket.create_connection(("127.0.0.1", port))
    f = s.makefile("rb")
    reply(f)
    data = unesc(args[0])
    sent = 0
    s.setblocking(False)
    got = b""
    closed = False
    for i in range(len(data)):
        try:
            s.send(data[i:i + 1])
            sent += 1
        except OSError:
            closed = True
            break
        end = time.time() + 1.0
        while time.time() < end:
            try:
                b = s.recv(4096)
                if not b:
                    closed = True
                    break
                got += b
            except BlockingIOError:
                time.sleep(0.05)
            except OSError:
                closed = True
                break
        if closed:
            break
    show(got)
    out("R: ", "sent %d of %d closed %s" % (sent, len(data), "yes" if closed else "no"))

else:
    sys.exit("unknown case " + case)
