import asyncio, os
import pytest
from tests.interop import test_tls_dialogue_vs_postfix as t
from tests.support.tls_dialogues import generated
pytestmark = pytest.mark.interop
pki = t.pki
sasl_dovecot = t.sasl_dovecot
postfix = t.postfix

async def test_probe(postfix, pki, sasl_dovecot, mailflow_server):
    root, tls = pki
    ours = await t.mailflow_ports(mailflow_server, root, sasl_dovecot)
    for seed in [int(x) for x in os.environ["SEEDS"].split(",")]:
        service, steps = generated(seed)
        a, b = await asyncio.gather(t.replay(postfix[1][service], service == "submissions", tls, steps),
                                    t.replay(ours[service], service == "submissions", tls, steps))
        print(seed)
        for x, y in zip(a, b):
            print("  ", x, "|", y)
