"""discard_ehlo_keyword_address_maps' one answer (mailflow.ehlo_keywords.discards_for), as smtpd and sendmail -bs
ask it: the table's keywords for the client, else discard_ehlo_keywords; a table that cannot answer is logged."""
from __future__ import annotations

import logging

from mailflow.config import config_from_dict
from mailflow.ehlo_keywords import discards_for
from mailflow.sendmail.stdio_smtp import _discards
from mailflow.tables import open_table

DEFAULT = frozenset({"vrfy"})


def test_the_table_value_for_the_address_else_the_default():
    table = open_table("inline:{ {127.0.0.1=auth bogus} }")
    assert discards_for([table], "127.0.0.1", DEFAULT) == (frozenset({"auth"}), False)
    assert discards_for([table], "192.0.2.1", DEFAULT) == (DEFAULT, False)
    assert discards_for([], "127.0.0.1", DEFAULT) == (DEFAULT, False)


def test_sendmail_bs_logs_a_table_that_cannot_answer_as_smtpd_does(caplog):
    caplog.set_level(logging.WARNING, logger="mailflow.smtpd")
    smtpd = config_from_dict({"smtpd": {"discard_ehlo_keywords": ["vrfy"],
                                        "discard_ehlo_keyword_address_maps": ["fail:down"]}}).smtpd
    assert _discards(smtpd, logging.getLogger("mailflow.smtpd")) == (DEFAULT, True)
    assert [r.getMessage().split(": table")[0] for r in caplog.records] == [
        "discard_ehlo_keyword_address_maps: 127.0.0.1"]
