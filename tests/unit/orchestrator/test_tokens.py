"""The tokens file, bearer parsing and token checks (grpc-free)."""

import hashlib
import os

import pytest

from orchestrator.tokens import AuthFailure, Principal, Role, TokenFile, TokenTable, bearer_token, token_sha256


def table_file(tmp_path, text: str):
    path = tmp_path / "tokens.yaml"
    path.write_text(text)
    return str(path)


def test_tokens_map_to_their_principal_and_nothing_else(tmp_path):
    path = table_file(tmp_path, f"- {{name: ci, tenant: acme, role: client, sha256: {token_sha256('s3cret')}}}\n"
                                f"- {{name: oncall, tenant: ops, role: operator, sha256: {token_sha256('r00t')}}}\n")
    table = TokenTable.load(path)
    assert table.authenticate("s3cret") == Principal("ci", "acme", Role.CLIENT)
    assert table.authenticate("r00t").operator
    for wrong in ("s3cret ", "S3cret", "", "r00", token_sha256("s3cret")):
        assert table.authenticate(wrong) is None
    assert len(table) == 2 and table.tenants == {"acme", "ops"}
    assert "s3cret" not in open(path).read()  # the file holds hashes only
    assert token_sha256("s3cret") == hashlib.sha256(b"s3cret").hexdigest()


H = token_sha256("x")


@pytest.mark.parametrize("text,match", [
    ("- {name: a, tenant: t, role: admin, sha256: " + H + "}\n", r"\[0\]\.role"),
    ("- {name: a, tenant: t, role: client, sha256: abc}\n", r"\[0\]\.sha256"),
    ("- {name: a, tenant: 't t', role: client, sha256: " + H + "}\n", r"\[0\]\.tenant"),
    ("- {name: a, tenant: t, role: client, sha256: " + H + ", token: x}\n", r"\[0\]\.token: unknown key"),
    ("- {name: a, tenant: t, role: client, sha256: " + H + "}\n"
     "- {name: b, tenant: u, role: client, sha256: " + H + "}\n", "same sha256 twice"),
    ("[]\n", "lists no token"),
    ("{a: 1}\n", "list"),
    ("- [unclosed\n", "not a YAML list"),
])
def test_a_bad_tokens_file_is_refused_naming_the_entry_and_field(tmp_path, text, match):
    path = table_file(tmp_path, text)
    with pytest.raises(ValueError, match=match) as err:
        TokenTable.load(path)
    assert path in str(err.value)


def test_bearer_header_parsing():
    assert bearer_token([]) == (None, AuthFailure.MISSING)
    assert bearer_token(["Bearer abc"]) == ("abc", None)
    assert bearer_token(["bearer  abc "]) == ("abc", None)
    for bad in (["Basic abc"], ["Bearer "], ["abc"], ["Bearer a", "Bearer b"], ["Bearer " + "x" * 5000]):
        assert bearer_token(bad) == (None, AuthFailure.MALFORMED), bad


def test_the_tokens_file_is_re_read_when_it_changes_and_a_broken_one_keeps_the_last_good(tmp_path, caplog):
    path = tmp_path / "tokens.yaml"

    def write(text):  # as a Secret volume updates: a new file renamed over the old
        (tmp_path / "new.yaml").write_text(text)
        os.replace(tmp_path / "new.yaml", path)

    write(f"- {{name: a, tenant: t, role: client, sha256: {token_sha256('tok-a')}}}\n")
    tokens = TokenFile(str(path))
    assert tokens.authenticate("tok-a") and not tokens.authenticate("tok-b")
    write(f"- {{name: b, tenant: t, role: client, sha256: {token_sha256('tok-b')}}}\n")  # a revoked, b added
    assert not tokens.authenticate("tok-a") and tokens.authenticate("tok-b") and tokens.reloads == 1
    write("- {name: b, role: client}\n")  # broken: b stays valid, and it is said once
    assert tokens.authenticate("tok-b") and tokens.authenticate("tok-b")
    assert len([r for r in caplog.records if "cannot be used" in r.getMessage()]) == 1
