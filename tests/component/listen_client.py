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

else:
    sys.exit("unknown case " + case)
