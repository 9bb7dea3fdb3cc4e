"""Secrets are redacted before anything enters a prompt (detect-secrets), and look-alikes survive. Every sample is
built here with the real shape of its kind (random characters: none of them is a real credential)."""

from __future__ import annotations

import base64
import random
import string

import pytest

from ctxc.secrets import redact_secrets

R = random.Random(1234)


def _pick(alphabet: str, n: int) -> str:
    return "".join(R.choice(alphabet) for _ in range(n))


UP = string.ascii_uppercase + string.digits
ALNUM = string.ascii_letters + string.digits
AWS_ID = "AKIA" + _pick(UP, 16)
AWS_SECRET = _pick(ALNUM + "/+", 40)
GITHUB = "ghp_" + _pick(ALNUM, 36)
SLACK = f"xoxb-{_pick(string.digits, 12)}-{_pick(string.digits, 13)}-{_pick(ALNUM, 24)}"
PEM_BODY = "\n".join(base64.b64encode(R.randbytes(48)).decode() for _ in range(6))
PEM = f"-----BEGIN RSA PRIVATE KEY-----\n{PEM_BODY}\n-----END RSA PRIVATE KEY-----"
PASSWORD = "s3cr3t-" + _pick(ALNUM, 10)

LOOK_ALIKES = {
    "git sha": "3f786850e387550fdab836ed7e6dc881de23001b",
    "uuid": "123e4567-e89b-12d3-a456-426614174000",
    "aws docs example": "AKIAIOSFODNN7EXAMPLE",
    "placeholder": "<your-github-token>",
    "env lookup": 'os.environ["DB_PASSWORD"]',
    "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
}

SOURCE = f'''import os

AWS_ACCESS_KEY_ID = "{AWS_ID}"
aws_secret_access_key = "{AWS_SECRET}"
GITHUB_TOKEN = "{GITHUB}"
SLACK = "{SLACK}"
KEY = """{PEM}"""
db_password = "{PASSWORD}"

COMMIT = "{LOOK_ALIKES["git sha"]}"
REQUEST_ID = "{LOOK_ALIKES["uuid"]}"
EXAMPLE_KEY = "{LOOK_ALIKES["aws docs example"]}"
TOKEN_HINT = "{LOOK_ALIKES["placeholder"]}"
pw = {LOOK_ALIKES["env lookup"]}
EMPTY_SHA256 = "{LOOK_ALIKES["sha256"]}"
'''


@pytest.fixture(scope="module")
def redacted():
    (text, found), = redact_secrets([("settings.py", SOURCE)])
    return text, found


@pytest.mark.parametrize("secret,kind", [(AWS_ID, "AWS Access Key"), (AWS_SECRET, "AWS Access Key"),
                                         (GITHUB, "GitHub Token"), (SLACK, "Slack Token"),
                                         (PEM_BODY.splitlines()[2], "Private Key"), (PASSWORD, "Secret Keyword")])
def test_real_shaped_secrets_are_redacted_in_place(redacted, secret, kind):
    text, found = redacted
    assert secret not in text
    assert f"[REDACTED:{kind}]" in text
    assert kind in {f.kind for f in found}


def test_findings_name_file_and_line_and_keep_the_code_valid(redacted):
    import ast

    text, found = redacted
    lines = SOURCE.splitlines()
    by_kind = {f.kind: f.line for f in found}
    assert lines[by_kind["GitHub Token"] - 1].startswith("GITHUB_TOKEN")
    assert lines[by_kind["Slack Token"] - 1].startswith("SLACK")
    assert lines[by_kind["Private Key"] - 1].startswith('KEY = """-----BEGIN')
    assert all(f.path == "settings.py" for f in found)
    assert "BEGIN RSA" not in text and "END RSA" not in text  # the whole PEM block went, not only its first line
    ast.parse(text)  # only the values were replaced: the module still parses


@pytest.mark.parametrize("name", sorted(LOOK_ALIKES))
def test_look_alikes_survive(redacted, name):
    assert LOOK_ALIKES[name] in redacted[0]


def test_clean_text_is_untouched_and_scanning_is_fast():
    import inspect
    import json
    import time

    src = inspect.getsource(json.decoder) * 20  # ~200 KB of real code
    t = time.perf_counter()
    (out, found), = redact_secrets([("decoder.py", src)])
    assert out == src and found == []
    assert time.perf_counter() - t < 10  # detect-secrets alone takes ~1 s here; only candidate lines go through it
