"""The Debian package as a site admin installs it (guest/run-scenarios.sh did, before any
scenario): `apt-get install ./pruned_*_all.deb` offline, so every dependency came from Debian
packages already on the node; then `pruned --version`, `man pruned`, `pruned check-config`,
`systemctl enable --now pruned`. Here: what each of those left behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from vmlib import RESULTS, sh

INSTALL = RESULTS / "install"


def step(name: str) -> tuple[int, str]:
    """(exit status, output) of one installation step."""
    return int((INSTALL / f"{name}.rc").read_text()), (INSTALL / f"{name}.out").read_text()


def installed_version() -> str:
    return sh("dpkg-query", "-W", "-f=${Version}", "pruned").stdout


def test_apt_installed_it_offline_from_debian_packages_only() -> None:
    rc, out = step("apt-install")
    assert rc == 0, out
    # apt pulled in nothing: every Depends was met by Debian packages already on the node.
    new = out.split("The following NEW packages will be installed:", 1)[1].split("\n0 upgraded")[0]
    assert new.split() == ["pruned"], out
    assert "Need to get 0 B/" in out, out
    status = sh("dpkg-query", "-W", "-f=${db:Status-Abbrev} ${Architecture}", "pruned").stdout
    assert status.split() == ["ii", "all"], status
    # Nothing pip could have put there, and no compiler on the node.
    assert sh("python3", "-c", "import pip", check=False).returncode != 0
    assert not [c for c in ("gcc", "cc", "x86_64-linux-gnu-gcc") if shutil.which(c)]


def test_one_package_for_every_python3() -> None:
    # Architecture: all, code under /usr/lib/python3/dist-packages: no python3.X path, so the
    # package built on bookworm (3.11) runs under trixie's 3.13 and forky's 3.14 as it is.
    _rc, files = step("dpkg-L")
    assert "/usr/lib/python3/dist-packages/pruned/cli.py" in files.split()
    assert not [f for f in files.split() if "/python3." in f], files
    depends = sh("dpkg-query", "-W", "-f=${Depends}", "pruned").stdout
    assert "python3.1" not in depends, depends
    import pruned

    assert pruned.__file__.startswith("/usr/lib/python3/dist-packages/"), pruned.__file__


def test_version_is_the_packages() -> None:
    rc, out = step("version")
    assert rc == 0, out
    assert out.split()[-1] == installed_version().split("+")[0], (out, installed_version())


@pytest.mark.parametrize("page,name", [("man", "pruned"), ("man-policy", "pruned-policy")])
def test_man_page(page: str, name: str) -> None:
    rc, out = step(page)
    assert rc == 0, out
    assert "NAME" in out and name in out and len(out.splitlines()) > 50, out[:2000]


def test_check_config_of_the_installed_policy() -> None:
    rc, out = step("check-config")
    assert rc == 0, out
    assert "/etc/pruned/policy.d" in out, out


def test_enabled_and_started_by_the_admin() -> None:
    rc, out = step("enable-now")
    assert rc == 0, out
    unit = sh("systemctl", "show", "pruned.service", "-p", "FragmentPath", "-p",
              "UnitFileState").stdout
    assert "UnitFileState=enabled" in unit, unit
    # The package's own unit (/lib is /usr/lib on a merged-/usr system), not a copy in /etc.
    frag = unit.split("FragmentPath=", 1)[1].split()[0]
    assert Path(frag).resolve() == Path("/usr/lib/systemd/system/pruned.service").resolve(), frag
    assert "ExecStart=/usr/sbin/pruned run" in Path(frag).read_text()
