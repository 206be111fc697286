"""MAIL and RCPT: the session layer above secure.SecureCommands that opens a mail transaction.

What it owns
- `smtp_MAIL`: `MAIL FROM:<address> [params]` (RFC 5321 4.1.1.2): once its usage is right, the client's
  message rate (`refused_for_rate`: client_message_rate_limit, counted by the listener's anvil, as Postfix
  counts before the path's syntax), the path syntax of `address.parse_path`, the handler's `address_refusal`
  (the address as Postfix's extract_addr judges it, before the parameters: a required part of the handler, taken
  when the session is made), its parameters (`mail_parameters`:
  SIZE, BODY, SMTPUTF8, AUTH= (RFC 4954: accepted, not trusted; kept as the message's sasl_sender, as Postfix
  keeps it), RET and ENVID (RFC 3461): the words read by mailflow.smtp_parameters), the sender-login check,
  then the handler's `handle_MAIL`.
- `smtp_RCPT`: `RCPT TO:<address> [NOTIFY=… ORCPT=…]`: once its usage is right, the client's recipient rate
  (client_recipient_rate_limit, as MAIL's: so a RCPT refused later counts too, as in Postfix), the recipient
  limit, then the handler's `handle_RCPT` (the restriction lists). The DSN parameters of each accepted
  recipient go to `Transaction.rcpt_dsn`, and the address as the client wrote it (quotes, trailing dot and case
  kept: Postfix's original recipient, for ORCPT, X-Original-To and DSN Original-Recipient) to
  `Transaction.rcpt_written`.
- The DSN keyword of EHLO is offered for these parameters (protocol.LAYER_KEYWORDS).

Failure behaviour (each refusal a `mailflow.status` reply; nothing raises for a client's input): no FROM:/TO:,
or nothing after it, 501 5.5.4; past the client's message or recipient rate 450 4.7.1 (logged; the session
goes on); a malformed path 501 5.1.7 / 5.1.3 (logged as Postfix's "Illegal address syntax"; so is an address
the handler finds malformed, with the same reply, no address named in it, as Postfix's; with
strict_rfc821_envelopes, a path without its angle brackets too). The parameters are
taken in the order given and the first bad one answers, as in Postfix: an unknown one 555 5.5.4; a malformed or
repeated DSN parameter 501 5.5.4 in Postfix's words (`Bad RET parameter syntax`, `Error: Bad NOTIFY parameter
syntax`, ...); a bad SIZE 501 5.5.4, one past OFF_T_MAX (Postfix's "file system imposed limit") 552 5.3.4, one over
message_size_limit 552 5.3.4 once all are taken; AUTH= after one that named a sender 503 5.5.4. Out of order, each
503 5.5.1, in Postfix's order: MAIL before HELO/EHLO with helo_required (asked first, even after a refused BDAT),
MAIL twice, MAIL once a BDAT was taken or refused in this transaction; RCPT before MAIL, RCPT after BDAT. Past
recipient_limit 452 4.5.3, counted as an error only past recipient_overshoot_limit.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from mailflow import status
from mailflow.smtp_parameters import PathRefusal, checked_path, mail_parameters, path_text, rcpt_parameters
from mailflow.stages.smtpd.secure import SecureCommands
from mailflow.stages.smtpd.state import NULL_SENDER
from mailflow.syntax import COMMAND_BLANKS, ascii_upper, command_words


class TransactionCommands(SecureCommands):
    """MAIL and RCPT: see the module doc."""

    def __init__(self, handler, **kwargs):
        """`handler` must judge MAIL's and RCPT's addresses: `address_refusal(server, session, envelope, command,
        address, smtputf8) -> Reply | None` (no session takes an address unjudged: AttributeError without it)."""
        super().__init__(handler, **kwargs)
        self._judge_address = handler.address_refusal

    # the path of the MAIL or RCPT being answered as the client sent it: the handler's "Illegal address syntax"
    # line names it when it refuses the address itself (a bad domain, a leading '-'), as Postfix's extract_addr
    path_as_sent = ""

    async def smtp_MAIL(self, arg: str | None) -> None:
        """`MAIL FROM:<address> [params]`; the reply is the handler's unless the session refuses first."""
        if await self.check_helo_needed():  # before "nested MAIL" and "MAIL after BDAT", as Postfix's mail_cmd
            return
        taken = await self._arguments(arg, "MAIL", status.SENDER_SYNTAX, self._mail_out_of_order())
        if taken is None:
            return
        sender, (options, ret, envid, auth), _ = taken
        self.envelope.smtp_utf8 = "SMTPUTF8" in options
        refusal = await self._sender_refusal(sender or NULL_SENDER)
        if refusal is not None:
            self.log_reject("MAIL", refusal, sender=sender or NULL_SENDER)
            await self.push(refusal)
            return
        reply = await self._call_handler_hook("MAIL", sender or NULL_SENDER, options)
        if self.envelope.mail_from:
            self.envelope.dsn_ret, self.envelope.dsn_envid = ret, envid
            self.envelope.auth_sender = auth
        await self.push(reply)

    async def smtp_RCPT(self, arg: str | None) -> None:
        """`RCPT TO:<address> [NOTIFY=… ORCPT=…]`. Past `recipient_limit` the answer is 452 4.5.3, which
        counts as an error only past `recipient_overshoot_limit` (RFC 5321 4.5.3.1.10: the client may go on
        and send the message to the recipients already accepted)."""
        taken = await self._arguments(arg, "RCPT", status.RECIPIENT_SYNTAX, self._rcpt_out_of_order())
        if taken is None:
            return
        rcpt, notify_orcpt, written = taken
        if len(self.envelope.rcpt_tos) >= self._limits.recipient_limit:
            self.envelope.overshoot += 1
            over = self.envelope.overshoot > self._limits.recipient_overshoot_limit  # (Postfix's rcpt_overlim)
            await self.push(replace(status.TOO_MANY_RECIPIENTS, error_class="policy") if over
                            else status.TOO_MANY_RECIPIENTS, counts_as_error=over)
            return
        before = len(self.envelope.rcpt_tos)
        reply = await self._call_handler_hook("RCPT", rcpt, [])
        if len(self.envelope.rcpt_tos) > before:
            self.envelope.rcpt_dsn.append(notify_orcpt)
            self.envelope.rcpt_written.append(written)
        await self.push(reply)

    def _mail_out_of_order(self) -> status.Reply | None:
        if self.envelope.mail_from:
            return status.NESTED_MAIL
        return status.MAIL_AFTER_BDAT if self.envelope.processing_bdat else None

    def _rcpt_out_of_order(self) -> status.Reply | None:
        if not self.envelope.mail_from:
            return status.NEED_MAIL
        return status.RCPT_AFTER_BDAT if self.envelope.processing_bdat else None

    async def _arguments(self, arg: str | None, command: str, bad_path: status.Reply,
                         out_of_order: status.Reply | None):
        """What MAIL and RCPT share (MAIL has asked for HELO already): `out_of_order` if given (MAIL twice, RCPT
        before MAIL or after BDAT: Postfix's first answer; RCPT needs no HELO check, as no MAIL is taken without
        one), then the login, the path, then its parameter words (`_parameter_values`: a refusal or their
        values). (address, values), or None when a refusal was sent."""
        if out_of_order is not None:
            await self.push(out_of_order)
            return None
        if await self.check_auth_needed(command):
            return None
        parsed = await self._path_argument(arg, command, bad_path)
        if parsed is None:
            return None
        addr, written, words = parsed
        if addr and await self._address_refused(command, addr, words):
            return None
        values = self._parameter_values(command, words)
        if isinstance(values, status.Reply):
            if values is status.SIZE_EXCEEDS_LIMIT:  # a policy refusal, logged (Postfix's smtpd_check_size); the
                self.log_reject(command, values, sender=addr or NULL_SENDER)  # syntax refusals are replies only
            await self.push(values)
            return None
        return addr, values, written

    def _parameter_values(self, command: str, words: list[str]) -> Any:
        """MAIL's or RCPT's parameter words read by mailflow.smtp_parameters: their values, or a refusal."""
        if command == "MAIL":
            return mail_parameters(words, self.data_size_limit, self.discarded)
        return rcpt_parameters(words, self.discarded)

    async def _address_refused(self, command: str, addr: str, words: list[str]) -> bool:
        """The handler's `address_refusal`: an address it finds malformed is refused before the parameters are
        looked at, as Postfix's extract_addr refuses it (`smtputf8`: MAIL's own SMTPUTF8 parameter, which Postfix
        looks for first; the transaction's at RCPT). True when its refusal was sent."""
        smtputf8 = self.envelope.smtp_utf8 if command == "RCPT" else (
            "smtputf8" not in self.discarded and any(ascii_upper(w) == "SMTPUTF8" for w in words))
        refusal = self._judge_address(self, self.session, self.envelope, command, addr, smtputf8)
        if refusal is None:
            return False
        await self.push(refusal)
        return True

    async def _path_argument(self, arg: str | None, command: str, bad: status.Reply):
        """(address, address as written, parameter words) of `FROM:<address> params` or `TO:…`, or None when a
        refusal was sent:
        501 5.5.4 usage without the keyword or without a path (`path_text`), then the client's MAIL or RCPT rate
        counted (450 4.7.1 past its limit: a malformed path counts too, as in Postfix), `bad` (501 5.1.7 / 5.1.3)
        for a malformed path, and with strict_rfc821_envelopes for one not in angle brackets (Postfix's
        extract_addr)."""
        text = path_text(arg, command)
        if isinstance(text, status.Reply):
            await self.push(text)
            return None
        if await self.refused_for_rate(command.lower()):  # "mail" or "rcpt", counted where Postfix counts them
            return None
        path = checked_path(text, command, bad, self._limits.strict_rfc821_envelopes)
        if isinstance(path, PathRefusal):
            if path.logged is not None:
                self.record.lines.illegal_address(self.session.client, command, path.logged)
            await self.push(path.reply)
            return None
        addr, written, rest = path
        self.path_as_sent = text[:len(text) - len(rest)].strip(COMMAND_BLANKS)  # (what the handler's refusal logs)
        return addr, written, command_words(rest)  # parameters after HELO too, as Postfix takes them
