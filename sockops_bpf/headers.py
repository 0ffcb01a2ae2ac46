"""Find kernel headers bcc can compile against, and say exactly what is missing when there are none.

bcc wants a kernel build tree. Our programs use UAPI types only, so the running kernel's tree is
best but a distro `linux-headers-*` package of another version works too. Debian splits those into
`linux-headers-<ver>-<arch>` (generated files) and `linux-headers-<ver>-common` (the rest); bcc
expects one tree, so we join the two with a tree of symlinks in a cache folder.
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

from sockops_bpf.errors import BpfError

CACHE_DIR = Path(os.environ.get("MESHACCEL_CACHE", "/var/cache/meshaccel")) / "kheaders"


def _is_tree(p: Path) -> bool:
    return (p / "include" / "linux" / "kconfig.h").is_file() and (p / "include" / "generated").is_dir()


def _debian_pairs(src: Path = Path("/usr/src")) -> list[tuple[Path, Path]]:
    """(arch dir, common dir) pairs of Debian header packages, newest first."""
    pairs = []
    for arch_dir in sorted(src.glob("linux-headers-*"), reverse=True):
        name = arch_dir.name
        if name.endswith("-common") or not (arch_dir / "include" / "generated").is_dir():
            continue
        base = name.rsplit("-", 1)[0]  # linux-headers-6.1.0-56-amd64 -> linux-headers-6.1.0-56
        common = src / f"{base}-common"
        if (common / "include" / "linux" / "kconfig.h").is_file():
            pairs.append((arch_dir, common))
    return pairs


def _merge(arch_dir: Path, common: Path) -> Path:
    """One tree of symlinks: common first, arch-specific files on top. Built once, then reused."""
    dest = CACHE_DIR / arch_dir.name
    if _is_tree(dest):
        return dest
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for tree in (common, arch_dir):
        for root, _dirs, files in os.walk(tree, followlinks=False):
            rel = Path(root).relative_to(tree)
            (tmp / rel).mkdir(parents=True, exist_ok=True)
            for f in files:
                link = tmp / rel / f
                if link.is_symlink() or link.exists():
                    link.unlink()
                os.symlink(Path(root) / f, link)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def find_kernel_headers(modules: Path = Path("/lib/modules"), usr_src: Path = Path("/usr/src")) -> Path:
    """A kernel header tree for BCC_KERNEL_SOURCE, or a BpfError naming what to install."""
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env:
        if _is_tree(Path(env)):
            return Path(env)
        raise BpfError(f"BCC_KERNEL_SOURCE={env} is not a kernel header tree (no include/linux/kconfig.h)")
    release = platform.release()
    running = modules / release / "build"
    if _is_tree(running.resolve()):
        return running.resolve()
    source = modules / release / "source"
    if running.is_dir() and source.is_dir():
        return _merge(running.resolve(), source.resolve())
    pairs = _debian_pairs(usr_src)
    if pairs:
        return _merge(*pairs[0])
    raise BpfError(
        f"no kernel headers: {modules}/{release}/build is missing and no linux-headers-* package is in "
        f"{usr_src}; install the headers of the running kernel or Debian's linux-headers-amd64 "
        "(scripts/setup.sh does)"
    )
