"""Every numeric main.cf parameter mailflow maps (mailflow.config.postfix_names.SETTINGS) refuses what Postfix 3.7
refuses: a value below the minimum or above the maximum of its daemons' CONFIG_INT_TABLE / CONFIG_NINT_TABLE /
CONFIG_LONG_TABLE / CONFIG_TIME_TABLE entries (src/*/*.c; min and max 0: no bound; mail_conf_int.c's
check_mail_conf_int), any negative time (conv_time.c), and an int beyond a C int's 2**31 - 1 (mail_conf_int.c's
convert_mail_conf_int: "bad numerical configuration"; durations stop there already, the LONG ones at 2**63 - 1).
Where several daemons read one parameter, the strictest.

mailflow's durations also take fractions of a second (tests use them): a TIME minimum of 1 is taken as "more than
0", which refuses every value of Postfix's own syntax that Postfix refuses (0)."""
from __future__ import annotations

import types
import typing

import pytest

from mailflow.config import Config
from mailflow.config.load import config_from_dict
from mailflow.config.postfix_names import SETTINGS
from mailflow.errors import ConfigError

# (Postfix name, table kind, min, max) from Postfix 3.7's daemons' tables, the files that read it
POSTFIX_RANGES = [
    ("access_map_defer_code", "INT", 0, 0),  # smtpd/smtpd.c
    ("access_map_reject_code", "INT", 0, 0),  # smtpd/smtpd.c
    ("address_verify_negative_expire_time", "TIME", 1, 0),  # verify/verify.c
    ("address_verify_negative_refresh_time", "TIME", 1, 0),  # verify/verify.c
    ("address_verify_poll_count", "NINT", 1, 0),  # smtpd/smtpd.c
    ("address_verify_poll_delay", "TIME", 1, 0),  # smtpd/smtpd.c
    ("address_verify_positive_expire_time", "TIME", 1, 0),  # verify/verify.c
    ("address_verify_positive_refresh_time", "TIME", 1, 0),  # verify/verify.c
    ("address_verify_sender_ttl", "TIME", 0, 0),  # smtpd/smtpd.c, verify/verify.c
    ("anvil_rate_time_unit", "TIME", 1, 0),  # anvil/anvil.c
    ("body_checks_size_limit", "INT", 0, 0),  # cleanup/cleanup_init.c
    ("bounce_queue_lifetime", "TIME", 0, 8640000),  # oqmgr/qmgr.c, qmgr/qmgr.c
    ("bounce_size_limit", "INT", 1, 0),  # bounce/bounce.c
    ("command_time_limit", "TIME", 1, 0),  # local/local.c, pipe/pipe.c, spawn/spawn.c
    ("default_destination_concurrency_failed_cohort_limit", "INT", 0, 0),  # oqmgr/qmgr.c, qmgr/qmgr.c
    ("default_destination_concurrency_limit", "INT", 0, 0),  # oqmgr/qmgr.c, qmgr/qmgr.c
    ("default_destination_rate_delay", "TIME", 0, 0),  # oqmgr/qmgr.c, qmgr/qmgr.c
    ("default_destination_recipient_limit", "INT", 0, 0),  # oqmgr/qmgr.c, qmgr/qmgr.c
    ("default_process_limit", "INT", 1, 0),  # global/mail_params.c
    ("defer_code", "INT", 0, 0),  # smtpd/smtpd.c
    ("delay_warning_time", "TIME", 0, 0),  # bounce/bounce.c, cleanup/cleanup_init.c
    ("header_size_limit", "INT", 1, 0),  # global/mail_params.c
    ("hopcount_limit", "INT", 1, 0),  # cleanup/cleanup_init.c
    ("initial_destination_concurrency", "INT", 1, 0),  # oqmgr/qmgr.c, qmgr/qmgr.c
    ("invalid_hostname_reject_code", "INT", 0, 0),  # smtpd/smtpd.c
    ("line_length_limit", "INT", 512, 0),  # global/mail_params.c
    ("lmtp_connect_timeout", "TIME", 0, 0),  # smtp/lmtp_params.c
    ("lmtp_connection_cache_time_limit", "TIME", 1, 0),  # smtp/lmtp_params.c
    ("lmtp_connection_reuse_count_limit", "INT", 0, 0),  # smtp/lmtp_params.c
    ("lmtp_connection_reuse_time_limit", "TIME", 1, 0),  # smtp/lmtp_params.c
    ("lmtp_data_done_timeout", "TIME", 1, 0),  # smtp/lmtp_params.c
    ("lmtp_data_init_timeout", "TIME", 1, 0),  # smtp/lmtp_params.c
    ("lmtp_data_xfer_timeout", "TIME", 1, 0),  # smtp/lmtp_params.c
    ("lmtp_lhlo_timeout", "TIME", 1, 0),  # smtp/lmtp_params.c
    ("lmtp_mail_timeout", "TIME", 1, 0),  # smtp/lmtp_params.c
    ("lmtp_rcpt_timeout", "TIME", 1, 0),  # smtp/lmtp_params.c
    ("mailbox_size_limit", "LONG", 0, 0),  # local/local.c
    ("maps_rbl_reject_code", "INT", 0, 0),  # smtpd/smtpd.c
    ("maximal_backoff_time", "TIME", 1, 0),  # oqmgr/qmgr.c, qmgr/qmgr.c
    ("maximal_queue_lifetime", "TIME", 0, 8640000),  # bounce/bounce.c, oqmgr/qmgr.c, qmgr/qmgr.c
    ("message_size_limit", "LONG", 0, 0),  # global/mail_params.c
    ("milter_command_timeout", "TIME", 1, 0),  # cleanup/cleanup_init.c, smtpd/smtpd.c
    ("milter_connect_timeout", "TIME", 1, 0),  # cleanup/cleanup_init.c, smtpd/smtpd.c
    ("milter_content_timeout", "TIME", 1, 0),  # cleanup/cleanup_init.c, smtpd/smtpd.c
    ("minimal_backoff_time", "TIME", 1, 0),  # oqmgr/qmgr.c, qmgr/qmgr.c, smtp/lmtp_params.c, smtp/smtp_params.c
    ("multi_recipient_bounce_reject_code", "INT", 0, 0),  # smtpd/smtpd.c
    ("non_fqdn_reject_code", "INT", 0, 0),  # smtpd/smtpd.c
    ("plaintext_reject_code", "INT", 0, 0),  # smtpd/smtpd.c
    ("postscreen_bare_newline_ttl", "TIME", 1, 0),  # postscreen/postscreen.c
    ("postscreen_client_connection_count_limit", "NINT", 0, 0),  # postscreen/postscreen.c
    ("postscreen_command_count_limit", "INT", 1, 0),  # postscreen/postscreen.c
    ("postscreen_command_time_limit", "TIME", 1, 0),  # postscreen/postscreen.c
    ("postscreen_dnsbl_allowlist_threshold", "NINT", 0, 0),  # postscreen/postscreen.c
    ("postscreen_dnsbl_max_ttl", "TIME", 1, 0),  # postscreen/postscreen.c
    ("postscreen_dnsbl_min_ttl", "TIME", 1, 0),  # postscreen/postscreen.c
    ("postscreen_dnsbl_threshold", "INT", 1, 0),  # postscreen/postscreen.c
    ("postscreen_dnsbl_timeout", "TIME", 1, 0),  # postscreen/postscreen.c
    ("postscreen_greet_ttl", "TIME", 1, 0),  # postscreen/postscreen.c
    ("postscreen_greet_wait", "TIME", 1, 0),  # postscreen/postscreen.c
    ("postscreen_non_smtp_command_ttl", "TIME", 1, 0),  # postscreen/postscreen.c
    ("postscreen_pipelining_ttl", "TIME", 1, 0),  # postscreen/postscreen.c
    ("postscreen_pre_queue_limit", "NINT", 10, 0),  # postscreen/postscreen.c
    ("qmgr_message_active_limit", "INT", 1, 0),  # oqmgr/qmgr.c, qmgr/qmgr.c
    ("queue_minfree", "LONG", 0, 0),  # smtpd/smtpd.c
    ("queue_run_delay", "TIME", 1, 0),  # oqmgr/qmgr.c, qmgr/qmgr.c, smtp/lmtp_params.c, smtp/smtp_params.c
    ("reject_code", "INT", 0, 0),  # smtpd/smtpd.c
    ("relay_domains_reject_code", "INT", 0, 0),  # smtpd/smtpd.c
    ("smtp_connect_timeout", "TIME", 0, 0),  # smtp/smtp_params.c
    ("smtp_connection_cache_time_limit", "TIME", 1, 0),  # smtp/smtp_params.c
    ("smtp_connection_reuse_count_limit", "INT", 0, 0),  # smtp/smtp_params.c
    ("smtp_connection_reuse_time_limit", "TIME", 1, 0),  # smtp/smtp_params.c
    ("smtp_data_done_timeout", "TIME", 1, 0),  # smtp/smtp_params.c
    ("smtp_data_init_timeout", "TIME", 1, 0),  # smtp/smtp_params.c
    ("smtp_helo_timeout", "TIME", 1, 0),  # smtp/smtp_params.c
    ("smtp_mail_timeout", "TIME", 1, 0),  # smtp/smtp_params.c
    ("smtp_rcpt_timeout", "TIME", 1, 0),  # smtp/smtp_params.c
    ("smtp_rset_timeout", "TIME", 1, 0),  # smtp/smtp_params.c
    ("smtp_starttls_timeout", "TIME", 1, 0),  # smtp/smtp_params.c
    ("smtpd_client_auth_rate_limit", "INT", 0, 0),  # smtpd/smtpd.c
    ("smtpd_client_connection_count_limit", "INT", 0, 0),  # postscreen/postscreen.c, smtpd/smtpd.c
    ("smtpd_client_connection_rate_limit", "INT", 0, 0),  # smtpd/smtpd.c
    ("smtpd_client_message_rate_limit", "INT", 0, 0),  # smtpd/smtpd.c
    ("smtpd_client_new_tls_session_rate_limit", "INT", 0, 0),  # smtpd/smtpd.c
    ("smtpd_client_recipient_rate_limit", "INT", 0, 0),  # smtpd/smtpd.c
    ("smtpd_error_sleep_time", "TIME", 0, 0),  # smtpd/smtpd.c
    ("smtpd_hard_error_limit", "NINT", 1, 0),  # smtpd/smtpd.c
    ("smtpd_junk_command_limit", "NINT", 1, 0),  # smtpd/smtpd.c
    ("smtpd_min_data_rate", "INT", 1, 0),  # smtpd/smtpd.c
    ("smtpd_policy_service_max_idle", "TIME", 1, 0),  # smtpd/smtpd.c
    ("smtpd_policy_service_max_ttl", "TIME", 1, 0),  # smtpd/smtpd.c
    ("smtpd_policy_service_request_limit", "INT", 0, 0),  # smtpd/smtpd.c
    ("smtpd_policy_service_timeout", "TIME", 1, 0),  # smtpd/smtpd.c
    ("smtpd_recipient_limit", "INT", 1, 0),  # smtpd/smtpd.c
    ("smtpd_recipient_overshoot_limit", "INT", 1, 0),  # smtpd/smtpd.c
    ("smtpd_soft_error_limit", "NINT", 1, 0),  # smtpd/smtpd.c
    ("smtpd_starttls_timeout", "TIME", 1, 0),  # smtpd/smtpd.c
    ("smtpd_timeout", "TIME", 1, 0),  # smtpd/smtpd.c
    ("smtpd_upstream_proxy_timeout", "TIME", 1, 0),  # smtpd/smtpd.c
    ("unknown_address_reject_code", "INT", 0, 0),  # smtpd/smtpd.c
    ("unknown_client_reject_code", "INT", 0, 0),  # smtpd/smtpd.c
    ("unknown_hostname_reject_code", "INT", 0, 0),  # smtpd/smtpd.c
    ("unknown_local_recipient_reject_code", "INT", 0, 0),  # smtpd/smtpd.c
    ("unknown_relay_recipient_reject_code", "INT", 0, 0),  # smtpd/smtpd.c
    ("unknown_virtual_alias_reject_code", "INT", 0, 0),  # smtpd/smtpd.c
    ("unknown_virtual_mailbox_reject_code", "INT", 0, 0),  # smtpd/smtpd.c
    ("unverified_recipient_defer_code", "INT", 200, 499),  # smtpd/smtpd.c
    ("unverified_recipient_reject_code", "INT", 200, 599),  # smtpd/smtpd.c
    ("unverified_sender_defer_code", "INT", 200, 499),  # smtpd/smtpd.c
    ("unverified_sender_reject_code", "INT", 200, 599),  # smtpd/smtpd.c
    ("virtual_alias_expansion_limit", "INT", 1, 0),  # cleanup/cleanup_init.c
    ("virtual_alias_recursion_limit", "INT", 1, 0),  # cleanup/cleanup_init.c
    ("virtual_mailbox_limit", "LONG", 0, 0),  # virtual/virtual.c
]

# a value Postfix refuses that mailflow gives a meaning of its own, with why
MAILFLOW_MEANINGS = {
    ("smtp.connection_cache_time_limit", 0): "0s: the cache off (config import writes it for Postfix's "
                                             "smtp_connection_cache_on_demand = no without destinations)",
    ("lmtp.connection_cache_time_limit", 0): "0s: the cache off (as [smtp]'s)",
}

# mapped numeric settings whose Postfix parameter is in no such table (checked in its own code, or an alias)
NOT_IN_A_TABLE = {"milter_protocol", "smtp_tls_loglevel", "smtpd_tls_loglevel", "postscreen_dnsbl_ttl",
                  "postscreen_dnsbl_whitelist_threshold"}


def refused_by_postfix(kind: str, low: int, high: int) -> list[int]:
    values = [low - 1] if low else []
    if kind == "TIME" and -1 not in values:
        values.append(-1)  # conv_time: no negative time
    return values + ([high + 1] if high else [2**31] if kind in ("INT", "NINT") else [])


def nested(key: str, value: int) -> dict:
    *sections, last = key.split(".")
    data: dict = {last: value}
    for section in reversed(sections):
        data = {section: data}
    return data


SWEEP = [(name, key, value) for name, kind, low, high in POSTFIX_RANGES for key in SETTINGS[name]
         for value in refused_by_postfix(kind, low, high) if (key, value) not in MAILFLOW_MEANINGS]


@pytest.mark.parametrize("name, key, value", SWEEP, ids=[f"{key}={value}" for _, key, value in SWEEP])
def test_a_numeric_setting_refuses_what_postfix_refuses(name, key, value):
    with pytest.raises(ConfigError) as refused:
        config_from_dict(nested(key, value), "mailflow.toml")
    assert str(refused.value).startswith(f"mailflow.toml: {key}: "), str(refused.value)


def test_the_sweep_covers_every_numeric_setting_mapped_from_main_cf():
    """A numeric setting mapped later is swept too: its Postfix range belongs in POSTFIX_RANGES."""
    swept = {name for name, *_ in POSTFIX_RANGES}
    numeric = set()
    for name, keys in SETTINGS.items():
        for key in keys:
            model, (*sections, last) = Config, key.split(".")
            for section in sections:
                model = model.model_fields[section].annotation
            field = model.model_fields.get(last)
            if field is not None and set(_unwrapped(field.annotation)) & {int, float}:
                numeric.add(name)
    assert numeric - swept - NOT_IN_A_TABLE == set()
    assert {key for key, _ in MAILFLOW_MEANINGS} <= {key for name in swept for key in SETTINGS[name]}


def _unwrapped(annotation: object) -> tuple[object, ...]:
    """The types of an annotation, `int | None` (an optional setting) as int."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(annotation) for t in _unwrapped(arg))
    if typing.get_origin(annotation) is typing.Annotated:
        return (typing.get_args(annotation)[0],)
    return (annotation,)


def test_the_coverage_check_sees_an_optional_numeric_setting():
    from mailflow.config.smtpd import PostscreenConfig

    assert int in _unwrapped(int | None) and float in _unwrapped(PostscreenConfig.model_fields[
        "command_time_limit"].annotation)


# values Postfix takes that mailflow refuses on purpose, with why (the converse sweep skips them)
DEVIATIONS = {
    # mailflow's minimums from before the sweep, kept (not matched to what Postfix's daemons do with them)
    ("header_size_limit", 1): "at least 1024 bytes (a smaller header section limit refuses ordinary mail)",
    ("default_destination_concurrency_limit", 0): "at least 1 (a concurrency limit of its own)",
    ("default_destination_concurrency_failed_cohort_limit", 0): "at least 1 failed cohort before a site is dead",
    ("maximal_backoff_time", 1): "below minimal_backoff_time (300s): refused as a pair, not by range",
    ("postscreen_command_count_limit", 2**31 - 1): "mailflow bounds the pre-greeting commands it reads (1000)",
    ("postscreen_dnsbl_allowlist_threshold", 2**31 - 1): "Postfix ignores a positive allowlist threshold (off); "
                                                        "mailflow refuses it as a mistake: 0 is off",
    **{(name, value): "a reply code that is not a refusal (4xx, 5xx) would let mail through or say nothing; "
                      "Postfix takes any number and sends it"
       for name in ("maps_rbl_reject_code", "multi_recipient_bounce_reject_code", "plaintext_reject_code",
                    "access_map_reject_code", "access_map_defer_code", "reject_code", "defer_code",
                    "relay_domains_reject_code", "invalid_hostname_reject_code", "non_fqdn_reject_code",
                    "unknown_address_reject_code", "unknown_client_reject_code", "unknown_hostname_reject_code",
                    "unknown_local_recipient_reject_code", "unknown_relay_recipient_reject_code",
                    "unknown_virtual_alias_reject_code", "unknown_virtual_mailbox_reject_code")
       for value in (0, 2**31 - 1)},
    **{(name, 200): "a 2xx or 3xx verification code would accept or half-accept what was not verified"
       for name in ("unverified_recipient_defer_code", "unverified_recipient_reject_code",
                    "unverified_sender_defer_code", "unverified_sender_reject_code")},
}


def taken_by_postfix(kind: str, low: int, high: int) -> list[int]:
    return [low] + ([high] if high else [2**31 - 1] if kind in ("INT", "NINT") else [])


CONVERSE = [(name, key, value) for name, kind, low, high in POSTFIX_RANGES for key in SETTINGS[name]
            for value in taken_by_postfix(kind, low, high) if (name, value) not in DEVIATIONS]


@pytest.mark.parametrize("name, key, value", CONVERSE, ids=[f"{key}={value}" for _, key, value in CONVERSE])
def test_a_numeric_setting_takes_what_postfix_takes_but_the_listed_deviations(name, key, value):
    """The bounds Postfix takes, taken (a valid main.cf imports), unless DEVIATIONS says why not."""
    config_from_dict(nested(key, value), "mailflow.toml")


def test_the_deviations_are_still_refused():
    """An entry of DEVIATIONS that mailflow now takes is stale: remove it."""
    taken = []
    for (name, value), _ in DEVIATIONS.items():
        for key in SETTINGS[name]:
            try:
                config_from_dict(nested(key, value), "mailflow.toml")
                taken.append((key, value))
            except ConfigError:
                pass
    assert taken == []


@pytest.mark.parametrize("key", ["queue.transport_concurrency_limit", "queue.transport_destination_recipient_limit"])
def test_a_per_transport_limit_is_a_c_int_as_postfix_s(key):
    """qmgr_transport.c reads `transport_destination_concurrency_limit` and `_recipient_limit` with
    get_mail_conf_int2: beyond 2**31 - 1 is a bad numerical configuration; mailflow took 2**40."""
    section, name = key.split(".")
    config_from_dict({section: {name: {"smtp": 2**31 - 1}}}, "mailflow.toml")
    with pytest.raises(ConfigError) as refused:
        config_from_dict({section: {name: {"smtp": 2**31}}}, "mailflow.toml")
    assert str(refused.value).startswith(f"mailflow.toml: {key}"), str(refused.value)


def test_postscreen_s_stress_greet_wait_is_more_than_0_as_postscreen_greet_wait():
    """It is postscreen_greet_wait's value under stress (${stress?{2}:{6}}s): Postfix's minimum, 1s, holds."""
    with pytest.raises(ConfigError):
        config_from_dict({"smtpd": {"postscreen": {"stress_greet_wait": 0}}}, "mailflow.toml")
