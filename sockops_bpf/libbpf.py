"""Thin ctypes bindings to libbpf (Debian's libbpf1, a dependency of bcc) for what bcc's Python
side lacks: pinning, opening pins, cgroup attach with replace, detach, query, raw map access.
These work without compiling anything, so `accel status` and map writers stay cheap."""

from __future__ import annotations

import ctypes as ct
import ctypes.util
import errno
import os

_lib = ct.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)

# enum bpf_attach_type values we use (uapi/linux/bpf.h)
BPF_CGROUP_SOCK_OPS = 3
BPF_SK_MSG_VERDICT = 7
BPF_F_ALLOW_MULTI = 1 << 1
BPF_F_REPLACE = 1 << 2

BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_SOCKHASH = 18


class _AttachOpts(ct.Structure):
    _fields_ = [("sz", ct.c_size_t), ("flags", ct.c_uint32), ("replace_prog_fd", ct.c_int)]


class MapInfo(ct.Structure):
    """struct bpf_map_info (leading fields; the kernel fills what fits in the size we pass)."""

    _fields_ = [
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("key_size", ct.c_uint32),
        ("value_size", ct.c_uint32),
        ("max_entries", ct.c_uint32),
        ("map_flags", ct.c_uint32),
        ("name", ct.c_char * 16),
    ]


class ProgInfo(ct.Structure):
    """struct bpf_prog_info, leading fields up to `name`."""

    _fields_ = [
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("tag", ct.c_uint8 * 8),
        ("jited_prog_len", ct.c_uint32),
        ("xlated_prog_len", ct.c_uint32),
        ("jited_prog_insns", ct.c_uint64),
        ("xlated_prog_insns", ct.c_uint64),
        ("load_time", ct.c_uint64),
        ("created_by_uid", ct.c_uint32),
        ("nr_map_ids", ct.c_uint32),
        ("map_ids", ct.c_uint64),
        ("name", ct.c_char * 16),
    ]


_lib.bpf_obj_get.argtypes = [ct.c_char_p]
_lib.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
_lib.bpf_prog_attach_opts.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.POINTER(_AttachOpts)]
_lib.bpf_prog_detach2.argtypes = [ct.c_int, ct.c_int, ct.c_int]
_lib.bpf_prog_query.argtypes = [
    ct.c_int, ct.c_int, ct.c_uint32, ct.POINTER(ct.c_uint32), ct.POINTER(ct.c_uint32), ct.POINTER(ct.c_uint32)
]
_lib.bpf_map_lookup_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
_lib.bpf_map_update_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64]
_lib.bpf_map_delete_elem.argtypes = [ct.c_int, ct.c_void_p]
_lib.bpf_map_get_next_key.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
_lib.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
_lib.bpf_prog_get_fd_by_id.argtypes = [ct.c_uint32]


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ct.get_errno() or -ret
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def obj_get(path: str) -> int:
    return _check(_lib.bpf_obj_get(path.encode()), f"open pin {path}")


def obj_pin(fd: int, path: str) -> None:
    _check(_lib.bpf_obj_pin(fd, path.encode()), f"pin {path}")


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0, replace_fd: int = -1) -> None:
    opts = _AttachOpts(ct.sizeof(_AttachOpts), flags, replace_fd if replace_fd >= 0 else 0)
    _check(_lib.bpf_prog_attach_opts(prog_fd, target_fd, attach_type, ct.byref(opts)), "attach")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> bool:
    """Detach one program; False when it was not attached there."""
    ret = _lib.bpf_prog_detach2(prog_fd, target_fd, attach_type)
    if ret < 0:
        err = ct.get_errno() or -ret
        if err in (errno.ENOENT, errno.EINVAL):
            return False
        raise OSError(err, f"detach: {os.strerror(err)}")
    return True


def prog_query(target_fd: int, attach_type: int) -> list[int]:
    """IDs of the programs attached to target_fd (a cgroup or a map) for attach_type."""
    ids = (ct.c_uint32 * 64)()
    cnt = ct.c_uint32(64)
    flags = ct.c_uint32(0)
    _check(_lib.bpf_prog_query(target_fd, attach_type, 0, ct.byref(flags), ids, ct.byref(cnt)), "query")
    return list(ids[: cnt.value])


def prog_fd_by_id(prog_id: int) -> int:
    return _check(_lib.bpf_prog_get_fd_by_id(prog_id), f"open program id {prog_id}")


def prog_info(fd: int) -> ProgInfo:
    info = ProgInfo()
    size = ct.c_uint32(ct.sizeof(info))
    _check(_lib.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)), "program info")
    return info


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    size = ct.c_uint32(ct.sizeof(info))
    _check(_lib.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)), "map info")
    return info


def map_lookup(fd: int, key: ct.Structure | ct._SimpleCData, value: ct.Array | ct.Structure) -> bool:
    ret = _lib.bpf_map_lookup_elem(fd, ct.byref(key), ct.byref(value))
    if ret < 0:
        err = ct.get_errno() or -ret
        if err == errno.ENOENT:
            return False
        raise OSError(err, f"map lookup: {os.strerror(err)}")
    return True


def map_update(fd: int, key: ct.Structure, value: ct.Structure, flags: int = 0) -> None:
    _check(_lib.bpf_map_update_elem(fd, ct.byref(key), ct.byref(value), flags), "map update")


def map_delete(fd: int, key: ct.Structure) -> bool:
    ret = _lib.bpf_map_delete_elem(fd, ct.byref(key))
    if ret < 0:
        err = ct.get_errno() or -ret
        if err == errno.ENOENT:
            return False
        raise OSError(err, f"map delete: {os.strerror(err)}")
    return True


def map_keys(fd: int, key_type: type[ct.Structure]) -> list[ct.Structure]:
    """All keys of a hash-like map (a snapshot; entries may change while we walk)."""
    keys: list[ct.Structure] = []
    prev = None
    while True:
        nxt = key_type()
        ret = _lib.bpf_map_get_next_key(fd, ct.byref(prev) if prev is not None else None, ct.byref(nxt))
        if ret < 0:
            err = ct.get_errno() or -ret
            if err == errno.ENOENT:
                return keys
            raise OSError(err, f"map walk: {os.strerror(err)}")
        keys.append(nxt)
        prev = nxt


class _LinkCreateOpts(ct.Structure):
    # struct bpf_link_create_opts in libbpf 1.x: sz, flags, then a union we leave zeroed.
    _fields_ = [("sz", ct.c_size_t), ("flags", ct.c_uint32), ("_union", ct.c_uint8 * 64)]


class _LinkUpdateOpts(ct.Structure):
    _fields_ = [("sz", ct.c_size_t), ("flags", ct.c_uint32), ("old_prog_fd", ct.c_uint32),
                ("old_map_fd", ct.c_uint32)]


class LinkInfo(ct.Structure):
    """struct bpf_link_info with the cgroup arm of its union."""

    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("prog_id", ct.c_uint32), ("_pad", ct.c_uint32),
                ("cgroup_id", ct.c_uint64), ("attach_type", ct.c_uint32), ("_rest", ct.c_uint8 * 64)]


_lib.bpf_link_create.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.POINTER(_LinkCreateOpts)]
_lib.bpf_link_update.argtypes = [ct.c_int, ct.c_int, ct.POINTER(_LinkUpdateOpts)]


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """A bpf_link attachment: it lasts while the link is pinned or open, and its program can be
    swapped atomically with link_update (no moment without a program, no moment with two)."""
    opts = _LinkCreateOpts(ct.sizeof(_LinkCreateOpts), 0)
    return _check(_lib.bpf_link_create(prog_fd, target_fd, attach_type, ct.byref(opts)), "link create")


def link_update(link_fd: int, new_prog_fd: int) -> None:
    opts = _LinkUpdateOpts(ct.sizeof(_LinkUpdateOpts), 0, 0, 0)
    _check(_lib.bpf_link_update(link_fd, new_prog_fd, ct.byref(opts)), "link update")


def link_info(fd: int) -> LinkInfo:
    info = LinkInfo()
    size = ct.c_uint32(ct.sizeof(info))
    _check(_lib.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)), "link info")
    return info


# Ring buffers (BPF_MAP_TYPE_RINGBUF): libbpf calls `callback(ctx, data, size)` for each record while
# `ring_buffer_poll` runs; keep the callback object alive as long as the ring buffer.
RingBufferCallback = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_size_t)
_lib.ring_buffer__new.restype = ct.c_void_p
_lib.ring_buffer__new.argtypes = [ct.c_int, RingBufferCallback, ct.c_void_p, ct.c_void_p]
_lib.ring_buffer__poll.argtypes = [ct.c_void_p, ct.c_int]
_lib.ring_buffer__free.argtypes = [ct.c_void_p]


def ring_buffer_new(map_fd: int, callback: ct._CFuncPtr) -> int:  # type: ignore[name-defined]
    rb = _lib.ring_buffer__new(map_fd, callback, None, None)
    if not rb:
        err = ct.get_errno()
        raise OSError(err, f"ring_buffer__new: {os.strerror(err)}")
    return int(rb)


def ring_buffer_poll(rb: int, timeout_ms: int) -> int:
    """Records consumed (callbacks run), or -errno."""
    return int(_lib.ring_buffer__poll(rb, timeout_ms))


def ring_buffer_free(rb: int) -> None:
    _lib.ring_buffer__free(rb)
