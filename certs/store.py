"""Where the CA material lives: a Kubernetes Secret in a cluster, a root-only folder standalone.

Both hold Istio's `cacerts` layout (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem), so an
Istio `cacerts` Secret or folder can be pointed at directly to plug in an intermediate.
"""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path
from typing import Any, Protocol

from certs.ca import CACERTS_FILES, NEXT_ROOT_FILES, CaError, CaMaterial

ALL_FILES = CACERTS_FILES + NEXT_ROOT_FILES
KEY_FILES = ("ca-key.pem", "next-root-key.pem")


class CaStore(Protocol):
    def load(self) -> CaMaterial | None: ...
    def save(self, material: CaMaterial) -> None: ...
    def describe(self) -> str: ...


class FileStore:
    """A folder; the key file is mode 0600 and the folder 0700, and looser modes are refused on load."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)

    def describe(self) -> str:
        return f"folder {self.dir}"

    def load(self) -> CaMaterial | None:
        if not (self.dir / "ca-key.pem").exists():
            return None
        for name in KEY_FILES:
            key_path = self.dir / name
            if key_path.exists() and stat.S_IMODE(key_path.stat().st_mode) & 0o077:
                mode = stat.S_IMODE(key_path.stat().st_mode)
                raise CaError(f"{key_path} is mode {mode:04o}; a CA key must be readable by its owner only (chmod 600)")
        files: dict[str, str] = {}
        for name in ALL_FILES:
            p = self.dir / name
            if p.exists():
                files[name] = p.read_text()
        return CaMaterial.from_files(files)

    def save(self, material: CaMaterial) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        files = material.as_files()
        for name, text in files.items():
            write_atomic(self.dir / name, text, 0o600 if name in KEY_FILES else 0o644)
        for name in NEXT_ROOT_FILES:
            if name not in files:
                (self.dir / name).unlink(missing_ok=True)


def write_atomic(path: Path, text: str, mode: int) -> None:
    """Write beside the target with the final mode from the first byte, then rename over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


class SecretStore:
    """A `kubernetes.client.CoreV1Api` Secret with one data key per cacerts file."""

    def __init__(self, core_v1: Any, namespace: str, name: str = "cacerts") -> None:
        self.api = core_v1
        self.namespace = namespace
        self.name = name

    def describe(self) -> str:
        return f"Secret {self.namespace}/{self.name}"

    def load(self) -> CaMaterial | None:
        secret = self._read()
        if secret is None:
            return None
        data = secret.data or {}
        files = {k: base64.b64decode(v).decode() for k, v in data.items() if k in ALL_FILES}
        return CaMaterial.from_files(files)

    def save(self, material: CaMaterial) -> None:
        from kubernetes import client  # the client is only needed in a cluster

        data: dict[str, bytes | str] = {k: base64.b64encode(v.encode()).decode() for k, v in material.as_files().items()}
        existing = self._read()
        meta = client.V1ObjectMeta(
            name=self.name,
            namespace=self.namespace,
            labels={"app.kubernetes.io/managed-by": "meshaccel"},
            # Optimistic concurrency: a concurrent writer makes this replace fail with 409, not clobber.
            resource_version=existing.metadata.resource_version if existing is not None else None,
        )
        body = client.V1Secret(metadata=meta, type="Opaque", data=data)
        if existing is None:
            self.api.create_namespaced_secret(self.namespace, body)
        else:
            self.api.replace_namespaced_secret(self.name, self.namespace, body)

    def _read(self) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.api.read_namespaced_secret(self.name, self.namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise CaError(f"cannot read {self.describe()}: HTTP {e.status} {e.reason}") from None
