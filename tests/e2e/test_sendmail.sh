#!/usr/bin/env bash
# relayq sendmail as applications use /usr/sbin/sendmail:
# - -t -i with To/Cc/Bcc: one queue entry with the 3 recipients, Bcc gone
#   from the stored body, Date / Message-ID / From added, meta via/user;
# - recipients as arguments ("a, b" in one), -t plus arguments, -f, -F;
# - a lone dot ends input without -i (and sendmail stops reading there),
#   is kept with -i;
# - exit codes: 75 with Redis down, 64 bad usage, 65 bad address / no
#   recipient, 0 for the accepted no-op options;
# - run through a symlink named sendmail;
# - PHP's mail() with sendmail_path="... -t -i" (php-cli);
# - relayqd delivers a sendmail-submitted message to fakesmtpd, and the
#   delivered bytes are the submitted ones (CRLF) plus only the added
#   Message-ID, Date and From, minus Bcc (and a bare CR in the header
#   sent as a space, as the README's enqueue contract says).
#
# Env: RELAYQD_BIN, RELAYQ_BIN, RQ_BUILD_ROOT (for tests/fakesmtpd),
# RQ_SOURCE_ROOT.
set -u

TEST_TAG=sendmail-test
# shellcheck source=tests/e2e/lib.sh
source "$(dirname "$0")/lib.sh"

[ -x "$FAKE" ] || { echo "no fakesmtpd at $FAKE" >&2; exit 1; }
export TZ=UTC

start_redis

mkdir -p "$TMP/bin"
ln -s "$B" "$TMP/bin/sendmail"
SENDMAIL=$TMP/bin/sendmail
ME=$(id -un)
HOST=$(hostname)

# The one message of queue $1: its key.
msg_key() { rcli --scan --pattern "relayq:{$1}:msg:*"; }
count() { rcli --scan --pattern "relayq:{$1}:msg:*" | wc -l; }
# A field of the one message of queue $1, exact bytes, into file $3.
field_to() {
	rcli HGET "$(msg_key "$1")" "$2" >"$3"
	truncate -s -1 "$3"     # redis-cli's line end
}
field() { rcli HGET "$(msg_key "$1")" "$2"; }
expect_rc() {  # want, what, command...
	local want=$1 what=$2; shift 2
	"$@" >"$TMP/out" 2>"$TMP/err"
	local rc=$?
	if [ "$rc" -eq "$want" ]; then ok; else bad "$what: exit $rc, want $want: $(cat "$TMP/err")"; fi
}

# ---- 1. -t -i: recipients from To/Cc/Bcc, Bcc removed, fields added ----
Q=t-$$
printf 'To: Alice <alice@example.com>\nCc: "Smith, Bob" <bob@example.com>, alice@example.com\nBcc: carol@example.com\nSubject: hello\n\nline one\n.\n..two\n' >"$TMP/m1"
expect_rc 0 "-t -i" "$B" --queue "$Q" sendmail -t -i <"$TMP/m1"
[ -s "$TMP/out" ] && bad "-t -i: printed on success: $(cat "$TMP/out")" || ok
[ -s "$TMP/err" ] && bad "-t -i: stderr on success: $(cat "$TMP/err")" || ok
[ "$(count "$Q")" -eq 1 ] && ok || bad "-t -i: $(count "$Q") messages, want 1"
to=$(field "$Q" to)
[ "$to" = '["alice@example.com","bob@example.com","carol@example.com"]' ] && ok ||
	bad "-t -i: to is $to"
[ "$(field "$Q" from)" = "$ME@$HOST" ] && ok || bad "-t -i: from is $(field "$Q" from), want $ME@$HOST"
meta=$(field "$Q" meta)
[ "$meta" = "{\"user\":\"$ME\",\"via\":\"sendmail\"}" ] || [ "$meta" = "{\"via\":\"sendmail\",\"user\":\"$ME\"}" ] &&
	ok || bad "-t -i: meta is $meta"
field_to "$Q" body "$TMP/b1"
grep -qi '^bcc' "$TMP/b1" && bad "-t -i: Bcc still in the body" || ok
grep -q carol "$TMP/b1" && bad "-t -i: carol still in the body" || ok
grep -qE $'^Date: (Mon|Tue|Wed|Thu|Fri|Sat|Sun), [0-9]{2} [A-Z][a-z]{2} [0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} \\+0000\r$' "$TMP/b1" &&
	ok || bad "-t -i: no Date: $(cat -A "$TMP/b1" | head -8)"
grep -qE $'^Message-ID: <[0-9a-z]+\\.[0-9a-z]+@[^>]+>\r$' "$TMP/b1" && ok || bad "-t -i: no Message-ID"
grep -q $'^From: <'"$ME@$HOST"$'>\r$' "$TMP/b1" && ok || bad "-t -i: no From"
# CRLF everywhere, the lone dot and the dotted line kept
[ "$(grep -c $'\r$' "$TMP/b1")" -eq "$(wc -l <"$TMP/b1")" ] && ok || bad "-t -i: a line without CRLF"
tail -c 20 "$TMP/b1" | grep -q $'line one\r\n\\.\r\n\\.\\.two\r\n$' && ok ||
	bad "-t -i: body end: $(tail -c 30 "$TMP/b1" | od -c | head -3)"

# ---- 2. arguments, "a, b" in one, -t plus arguments, -f, -F ----
Q=args-$$
printf 'Subject: args\n\nhi\n' | "$B" --queue "$Q" sendmail -f sender@example.org 'x@example.net, Y <y@example.net>' z@example.net
[ "$(field "$Q" to)" = '["x@example.net","y@example.net","z@example.net"]' ] && ok ||
	bad "args: to is $(field "$Q" to)"
[ "$(field "$Q" from)" = sender@example.org ] && ok || bad "args: -f: from is $(field "$Q" from)"
field "$Q" body | grep -q '^From: <sender@example.org>' && ok || bad "args: From is not -f's"
Q=args2-$$
printf 'To: a@example.net\nFrom: Me <me@example.org>\n\nhi\n' |
	"$B" --queue "$Q" sendmail -t -i -fme@example.org -F 'Not Used' b@example.net A@EXAMPLE.NET
[ "$(field "$Q" to)" = '["a@example.net","b@example.net"]' ] && ok || bad "-t + args: to is $(field "$Q" to)"
field "$Q" body | grep -q '^From: Me <me@example.org>' && ok || bad "-t + args: From replaced"
[ "$(field "$Q" body | grep -c '^From:')" -eq 1 ] && ok || bad "-t + args: two From fields"
Q=args3-$$
printf 'Subject: s\n\nhi\n' | "$B" --queue "$Q" sendmail -r '<>' -F 'Cron Daemon' a@example.net
[ "$(field "$Q" from)" = "" ] && ok || bad "-r '<>': from is $(field "$Q" from)"
field "$Q" body | grep -q "^From: \"Cron Daemon\" <$ME@$HOST>" && ok || bad "-F: $(field "$Q" body | grep ^From)"

# ---- 3. dots ----
Q=dot-$$
printf 'Subject: dot\n\nbefore\n.\nafter\n' | "$B" --queue "$Q" sendmail a@example.net
field_to "$Q" body "$TMP/b3"
grep -q after "$TMP/b3" && bad "dot: a lone dot did not end the message" || ok
tail -c 8 "$TMP/b3" | grep -q $'before\r\n$' && ok || bad "dot: body end $(tail -c 10 "$TMP/b3" | od -c)"
# sendmail stops reading at the dot: the writer may keep the pipe open
Q=dot2-$$
# (process substitution: the pipeline would wait for the writer)
timeout 20 "$B" --queue "$Q" sendmail a@example.net < <(echo $BASHPID >"$TMP/writer.pid"
	printf 'Subject: dot\n\nbefore\r\n.\r\n'; exec sleep 60 >/dev/null 2>&1)
rc=$?
kill "$(cat "$TMP/writer.pid")" 2>/dev/null
[ $rc -eq 0 ] && ok || bad "dot: did not stop at the dot (exit $rc; 124: still reading)"
[ "$(count "$Q")" -eq 1 ] && ok || bad "dot: CRLF dot line: nothing queued"
Q=dot3-$$
printf 'Subject: dot\n\nbefore\n.\nafter\n' | "$B" --queue "$Q" sendmail -oi a@example.net
field "$Q" body | grep -q after && ok || bad "dot: -oi ended at the dot"
Q=dot4-$$
printf 'Subject: dot\n\n.. two dots\n.x\n' | "$B" --queue "$Q" sendmail a@example.net
field "$Q" body | grep -q '^\.\. two dots' && field "$Q" body | grep -q '^\.x' && ok ||
	bad "dot: lines starting with a dot changed"

# ---- 4. exit codes ----
Q=codes-$$
echo hi | RELAYQ_REDIS=unix:$TMP/nobody.sock "$B" --queue "$Q" sendmail a@example.net 2>"$TMP/err"
rc=$?
[ $rc -eq 75 ] && ok || bad "Redis down: exit $rc, want 75"
grep -q '^sendmail: cannot connect to Redis' "$TMP/err" && ok || bad "Redis down: stderr $(cat "$TMP/err")"
echo hi | RELAYQ_REDIS=redis://127.0.0.1:1/0 "$B" --queue "$Q" sendmail a@example.net 2>/dev/null
rc=$?
[ $rc -eq 75 ] && ok || bad "Redis down (tcp): exit $rc, want 75"
expect_rc 64 "unknown option" "$B" sendmail -Z a@example.net </dev/null
grep -q "^sendmail: unknown option '-Z'" "$TMP/err" && ok || bad "usage: stderr $(cat "$TMP/err")"
expect_rc 64 "-f without a value" "$B" sendmail -f </dev/null
expect_rc 64 "-bs" "$B" sendmail -bs </dev/null
expect_rc 64 "-oQ" "$B" sendmail -oQ/tmp a@example.net </dev/null
expect_rc 65 "bad recipient" "$B" --queue "$Q" sendmail root </dev/null
grep -q "^sendmail: bad recipient 'root'" "$TMP/err" && ok || bad "bad rcpt: stderr $(cat "$TMP/err")"
expect_rc 65 "bad sender" "$B" --queue "$Q" sendmail -f 'no at' a@example.net </dev/null
expect_rc 65 "no recipient" "$B" --queue "$Q" sendmail </dev/null
printf 'To: undisclosed-recipients:;\n\nx\n' >"$TMP/m4"
expect_rc 65 "-t, none in the header" "$B" --queue "$Q" sendmail -t <"$TMP/m4"
printf 'To: Smith, John <j@example.net>\n\nx\n' >"$TMP/m5"
expect_rc 65 "-t, malformed To" "$B" --queue "$Q" sendmail -t <"$TMP/m5"
expect_rc 78 "config missing" "$B" --queue "$Q" sendmail -c "$TMP/none.lua" a@example.net </dev/null
[ "$(count "$Q")" -eq 0 ] && ok || bad "codes: something was queued"
# the queue's own rules refuse: 65, not a retry
rcli HSET "relayq:{big-$$}:config" max_message_size 100 >/dev/null
head -c 300 /dev/zero | tr '\0' x | "$B" --queue "big-$$" sendmail a@example.net 2>"$TMP/err"
rc=$?
[ $rc -eq 65 ] && ok || bad "too large for the queue: exit $rc, want 65: $(cat "$TMP/err")"
expect_rc 0 "no-op options" "$B" --queue "noop-$$" sendmail -odi -odb -oem -oee -om -v -B 8BITMIME -B7BIT -N never -U -bm -R hdrs -V envid a@example.net </dev/null
"$B" sendmail --help | grep -q '^Usage: relayq sendmail' && ok || bad "--help"
# Debian cron's own command line
Q=cron-$$
printf 'Subject: Cron <root@h> job\n\noutput\n' | "$B" --queue "$Q" sendmail -FCronDaemon -i -B8BITMIME -oem ops@example.net
[ "$(field "$Q" to)" = '["ops@example.net"]' ] && field "$Q" body | grep -q '^From: "CronDaemon" <' && ok ||
	bad "cron: to $(field "$Q" to), $(field "$Q" body | grep ^From)"

# ---- 5. through a symlink named sendmail ----
Q=link-$$
printf 'To: l@example.net\n\nlinked\n' | "$SENDMAIL" --queue "$Q" -ti
rc=$?
[ $rc -eq 0 ] && [ "$(field "$Q" to)" = '["l@example.net"]' ] && ok || bad "symlink: exit $rc, to $(field "$Q" to)"
expect_rc 64 "symlink usage" "$SENDMAIL" -Z </dev/null
grep -q '^sendmail: ' "$TMP/err" && ok || bad "symlink: stderr $(cat "$TMP/err")"

# ---- 6. PHP's mail() ----
if command -v php >/dev/null; then
	Q=php-$$
	out=$(php -n -d sendmail_path="$SENDMAIL --queue $Q -t -i" -r '
		var_export(mail("Pat <pat@example.com>, sam@example.com", "Order 42", "Thanks\nfor your order.\n.\nbye",
			"From: Shop <shop@example.org>\r\nCc: cc@example.com\r\nBcc: hidden@example.com\r\nX-Mailer: PHP"));' 2>&1)
	[ "$out" = true ] && ok || bad "php: mail() returned $out"
	[ "$(field "$Q" to)" = '["pat@example.com","sam@example.com","cc@example.com","hidden@example.com"]' ] && ok ||
		bad "php: to is $(field "$Q" to)"
	field_to "$Q" body "$TMP/php"
	grep -q $'^Subject: Order 42\r$' "$TMP/php" && grep -q $'^From: Shop <shop@example.org>\r$' "$TMP/php" &&
		grep -q $'^X-Mailer: PHP\r$' "$TMP/php" && grep -q '^Message-ID: ' "$TMP/php" &&
		grep -q '^Date: ' "$TMP/php" && ok || bad "php: headers: $(head -12 "$TMP/php")"
	grep -qi hidden "$TMP/php" && bad "php: Bcc in the body" || ok
	grep -q $'^\\.\r$' "$TMP/php" && grep -q $'^bye\r$' "$TMP/php" && ok || bad "php: -i: body cut at the dot"
	# Redis down: mail() says false
	out=$(RELAYQ_REDIS=unix:$TMP/nobody.sock php -n -d sendmail_path="$SENDMAIL -t -i" -r '
		var_export(mail("pat@example.com", "s", "b"));' 2>/dev/null)
	[ "$out" = false ] && ok || bad "php: Redis down: mail() returned $out"
else
	bad "php-cli is not installed (scripts/setup installs it)"
fi

# ---- 7. relayqd delivers what sendmail queued, bytes as submitted ----
start_fake f1
Q=e2e-$$
cat >"$TMP/c.lua" <<EOF
relayq.config {
  redis = "unix:$SOCK",
  queue = "$Q",
  relay = "[127.0.0.1]:$FAKE_PORT",
  tls = "none",
  helo = "relayq.test",
}
EOF
printf 'To: Alice <alice@example.com>\r\nCc: bob@example.com\nBcc: carol@example.com,\n dave@example.com\nSubject: end to end\nX-Bare-CR: a\rb\n\n.leading dot\r\n..two\nlast line without end' >"$TMP/m7"
"$B" --queue "$Q" sendmail -t -i -f app@example.org <"$TMP/m7" || bad "e2e: sendmail exit $?"
"$D" -c "$TMP/c.lua" >>"$TMP/d.log" 2>&1 &
DPID=$!
PIDS+=($DPID)
delivered() { [ "$(rcli HGET "relayq:{$Q}:stats" delivered)" = 4 ]; }
wait_for 30 delivered && ok || bad "e2e: delivered $(rcli HGET "relayq:{$Q}:stats" delivered), want 4"
kill -TERM "$DPID"
wait "$DPID"
[ $? -eq 0 ] && ok || bad "e2e: relayqd exit status"
eml=$(ls "$FAKE_DIR"/msg-*.eml 2>/dev/null | head -1)
if [ -z "$eml" ]; then
	bad "e2e: nothing delivered"
else
	sort "$FAKE_DIR"/msg-*.env | tr -d '\r' >"$TMP/env"
	printf 'MAIL FROM:<app@example.org>\nRCPT TO:<alice@example.com>\nRCPT TO:<bob@example.com>\nRCPT TO:<carol@example.com>\nRCPT TO:<dave@example.com>\n' |
		sort >"$TMP/env.want"
	cmp -s "$TMP/env" "$TMP/env.want" && ok || bad "e2e: envelope $(cat "$TMP/env")"
	mid=$(grep -a '^Message-ID: ' "$eml" | tr -d '\r')
	date=$(grep -a '^Date: ' "$eml" | tr -d '\r')
	[[ $mid =~ ^Message-ID:\ \<[0-9a-z]+\.[0-9a-z]+@.+\>$ ]] && ok || bad "e2e: $mid"
	[[ $date =~ ^Date:\ [A-Z][a-z]{2},\ [0-9]{2}\ [A-Z][a-z]{2}\ [0-9]{4}\ [0-9:]{8}\ \+0000$ ]] && ok || bad "e2e: $date"
	# what was submitted, CRLF, Bcc (folded) removed, plus the 3 fields
	printf 'To: Alice <alice@example.com>\r\nCc: bob@example.com\r\nSubject: end to end\r\nX-Bare-CR: a b\r\n%s\r\n%s\r\nFrom: <app@example.org>\r\n\r\n.leading dot\r\n..two\r\nlast line without end\r\n' \
		"$mid" "$date" >"$TMP/want.eml"
	if cmp -s "$eml" "$TMP/want.eml"; then ok; else
		bad "e2e: delivered bytes differ"; diff <(od -c "$TMP/want.eml") <(od -c "$eml") | head -20 >&2
	fi
fi

echo "test_sendmail: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
