"""The last-good-policy store (pruned.policy.lastgood): exact bytes, atomic versions, one entry
per policy path, refused when not ours; and the epilog's choice of policy built on it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pruned.epilog import choose_policy
from pruned.policy import lastgood
from pruned.policy.load import load_path
from tests.unit.test_config import _write

GOOD = "version: 1\nmode: enforce\nkill:\n  grace: 3s\n"


def _save(path: Path, store: Path, by: str = "test") -> lastgood.Saved | None:
    return lastgood.save(str(path), load_path(path).contents, saved_by=by, store=str(store))


def test_save_keeps_exact_bytes_under_their_names(tmp_path: Path) -> None:
    d = tmp_path / "policy.d"
    d.mkdir()
    a = _write(d / "00-default.yaml", "version: 1\n# a comment that must survive\n")
    b = _write(d / "50-site.yaml", GOOD)
    store = tmp_path / "store"
    saved = _save(d, store, "check-config")
    assert saved is not None and saved.saved_by == "check-config"
    assert [os.path.basename(f) for f in saved.files] == ["00-default.yaml", "50-site.yaml"]
    assert [Path(f).read_bytes() for f in saved.files] == [a.read_bytes(), b.read_bytes()]
    assert saved.sources == (str(a), str(b))
    assert oct(os.stat(store).st_mode & 0o777) == oct(0o700)
    assert oct(os.stat(saved.directory).st_mode & 0o777) == oct(0o700)
    assert all(os.stat(f).st_mode & 0o777 == 0o600 for f in saved.files)
    entry = store / lastgood.key_for(str(d))
    assert entry.is_symlink() and os.readlink(entry) == os.path.basename(saved.directory)
    meta = json.loads((Path(saved.directory) / lastgood.META).read_text())
    assert meta["policy_path"] == str(d) and len(meta["files"]) == 2
    # What the epilog gets back: the same policy, read from the store.
    policy, again = lastgood.load(str(d), str(store))
    assert policy.kill_grace == 3.0 and not policy.dry_run
    assert again.files == saved.files


def test_unchanged_policy_is_not_saved_again(tmp_path: Path) -> None:
    p = _write(tmp_path / "p.yaml", GOOD)
    store = tmp_path / "store"
    first = _save(p, store)
    assert first is not None
    assert _save(p, store) is None  # same bytes: nothing written
    _write(p, GOOD + "min_age: 0s\n")
    second = _save(p, store)
    assert second is not None and second.directory != first.directory
    third_text = GOOD + "min_age: 1s\n"
    _write(p, third_text)
    third = _save(p, store)
    assert third is not None
    versions = sorted(e for e in os.listdir(store) if e.startswith("."))
    # The current version and the one before it (a reader may still be in it); older go.
    assert os.path.basename(first.directory) not in versions
    assert os.path.basename(second.directory) in versions
    assert lastgood.current(str(p), str(store)).files[0].endswith("p.yaml")
    assert Path(lastgood.current(str(p), str(store)).files[0]).read_text() == third_text


def test_one_entry_per_policy_path(tmp_path: Path) -> None:
    """Keys hold no '.', so /x/policy and /x/policy.d never touch each other's versions."""
    store = tmp_path / "store"
    (tmp_path / "policy.d").mkdir()
    a = _write(tmp_path / "policy", GOOD)
    b = _write(tmp_path / "policy.d" / "00.yaml", "version: 1\n")
    assert "." not in lastgood.key_for(str(tmp_path / "policy.d"))
    same = lastgood.key_for(str(tmp_path / "policy.d"))
    assert lastgood.key_for(f"{tmp_path}//policy.d/") == same
    _save(a, store)
    _save(b.parent, store)
    for text in ("version: 1\nmin_age: 1s\n", "version: 1\nmin_age: 2s\n"):
        _write(a, text)
        _save(a, store)
    assert lastgood.load(str(b.parent), str(store))[0].min_age == 10.0
    assert lastgood.load(str(a), str(store))[0].min_age == 2.0
    assert lastgood.current(str(tmp_path / "elsewhere.yaml"), str(store)) is None


def test_policy_path_that_is_not_utf8_keeps_its_own_entry(tmp_path: Path) -> None:
    """A directory name with a byte that is not UTF-8 (os.fsdecode gives a surrogate): the
    key quotes the real bytes, so it is saved and found again, apart from a UTF-8 look-alike."""
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/pol\xff.d"))
    odd.mkdir()
    _write(odd / "00.yaml", GOOD)
    store = tmp_path / "store"
    assert _save(odd, store) is not None
    key = lastgood.key_for(str(odd))
    assert "%FF" in key and (store / key).is_symlink()
    assert lastgood.load(str(odd), str(store))[0].kill_grace == 3.0
    assert lastgood.key_for(str(tmp_path / "pol\u00ff.d")) != key  # U+00FF is C3 BF


def test_no_last_good_and_untrusted_store(tmp_path: Path) -> None:
    p = _write(tmp_path / "p.yaml", GOOD)
    store = tmp_path / "store"
    with pytest.raises(lastgood.LastGoodError, match="no last good policy"):
        lastgood.load(str(p), str(store))
    _save(p, store)
    os.chmod(store, 0o777)  # anybody could have planted a policy here
    with pytest.raises(lastgood.LastGoodError, match="not trusted"):
        lastgood.load(str(p), str(store))
    os.chmod(store, 0o700)
    entry = store / lastgood.key_for(str(p))
    entry.unlink()
    entry.symlink_to("/etc")
    with pytest.raises(lastgood.LastGoodError, match="points outside the store"):
        lastgood.load(str(p), str(store))


def test_last_good_that_no_longer_validates_is_refused(tmp_path: Path) -> None:
    """A pruned upgrade may drop a key: the stored policy is validated again, not trusted."""
    p = _write(tmp_path / "p.yaml", GOOD)
    store = tmp_path / "store"
    saved = _save(p, store)
    Path(saved.files[0]).write_text(GOOD + "no_such_key_any_more: 1\n")
    with pytest.raises(lastgood.LastGoodError, match="no longer passes validation"):
        lastgood.load(str(p), str(store))


# ---------------------------------------------------------------- the epilog's choice


def test_choose_policy_good_broken_fallback_none(tmp_path: Path) -> None:
    store = tmp_path / "store"
    p = _write(tmp_path / "p.yaml", GOOD)
    ok = choose_policy(str(p), str(store))
    assert ok.policy is not None and ok.loaded is not None and not ok.rejected

    none = choose_policy(str(_write(tmp_path / "q.yaml", "version: 1\nmode: enforcing\n")),
                         str(store))
    assert none.policy is None and none.fallback is None
    assert "q.yaml:2: mode: expected one of report, enforce" in none.rejected
    assert "no last good policy" in none.no_fallback
    rec = none.record("epilog", "17", 1234)
    assert rec.event == "policy_fallback" and rec.priority == 4
    assert rec.fields["PRUNED_RESULT"] == "nothing done" and rec.fields["PRUNED_JOB_ID"] == "17"
    assert "doing nothing" in rec.message

    _save(p, store)
    _write(p, GOOD + "garbage: [\n")
    fb = choose_policy(str(p), str(store))
    assert fb.policy is not None and fb.loaded is None and fb.fallback is not None
    assert fb.policy.kill_grace == 3.0
    assert fb.first_error.startswith(f"{p}:6: YAML syntax error")
    rec = fb.record("epilog", "18", 1234)
    assert rec.fields["PRUNED_FALLBACK"] == fb.fallback.directory
    assert rec.fields["PRUNED_FALLBACK_FILES"] == str(p)
    assert "running with the last good policy" in rec.message


def test_choose_policy_survives_a_loader_bug(tmp_path: Path, monkeypatch) -> None:
    store = tmp_path / "store"
    p = _write(tmp_path / "p.yaml", GOOD)
    _save(p, store)

    def boom(_path):
        raise RecursionError("a bug")

    monkeypatch.setattr("pruned.epilog.load_path", boom)
    fb = choose_policy(str(p), str(store))
    assert fb.fallback is not None and fb.policy.kill_grace == 3.0
    assert "internal error: RecursionError: a bug" in fb.rejected


def test_only_the_nodes_policies_are_kept_unless_a_store_is_named(monkeypatch) -> None:
    monkeypatch.delenv(lastgood.STORE_ENV, raising=False)
    assert lastgood.keeps("/etc/pruned/policy.d") and lastgood.keeps("/etc/pruned/policy.yaml")
    assert lastgood.keeps("/etc/pruned/policy.d/")
    assert not lastgood.keeps("/etc/prunedx/policy.yaml")
    assert not lastgood.keeps("/tmp/draft.yaml")
    assert not lastgood.keeps("debian/pruned/etc/pruned/policy.d")  # a package build tree
    monkeypatch.setenv(lastgood.STORE_ENV, "/tmp/some-store")
    assert lastgood.keeps("/tmp/draft.yaml")
    assert lastgood.store_dir() == "/tmp/some-store"
