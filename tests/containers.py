"""Real containers for tests: podman, a base image made without a registry, the project's image and
compose file run by podman-compose.

This machine has no Docker engine and reaches no registry; ../shared/CONTAINERS.md has the recipe
this follows. The slow steps are kept where a later run reuses them:

- the tools (Debian's podman, runc, debootstrap), installed once with apt (about 25 s);
- the base image ``localhost/diloco-base:bookworm``, made once with debootstrap (about 1 min) and kept;
- the project image's dependency layer (torch, hivemind, transformers: about 2 min), kept in podman's
  build cache, so a rebuild after a code change takes seconds.

Everything a compose project makes (containers, its network, its volumes) is removed by
``Compose.down``, even after a failure. Needs root; ``available()`` says whether this machine allows it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASE_IMAGE = "localhost/diloco-base:bookworm"
IMAGE = "diloco-worker:cpu"  # the compose file's image
TOOLS = {"podman": "podman", "runc": "runc", "debootstrap": "debootstrap", "iptables": "iptables"}
DEBIAN_MIRROR = "http://deb.debian.org/debian"


def available() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "podman needs root here (rootless podman needs subuid maps this machine lacks)"
    if shutil.which("apt-get") is None and any(shutil.which(t) is None for t in TOOLS):
        return False, "podman, runc or debootstrap is missing and there is no apt-get to install them"
    return True, ""


def install_tools() -> None:
    """Debian's podman, runc, debootstrap and iptables (netavark's firewall), when any is missing."""
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True, timeout=300)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env, capture_output=True,
                   timeout=600)


def compose_tool() -> str:
    """podman-compose from this venv (a dev dependency): it reads the same docker-compose.yml."""
    path = Path(sys.executable).parent / "podman-compose"
    assert path.exists(), "make install adds podman-compose (the dev extra)"
    return str(path)


class Podman:
    """The podman CLI with this machine's settings: runc (crun refuses cgroups v1 in hybrid mode here) and
    explicit ulimits (the defaults cannot be set here: `setrlimit RLIMIT_NOFILE: Operation not
    permitted`). Both come from a containers.conf of our own, so podman-compose's calls get them too."""

    def __init__(self, conf_dir: Path) -> None:
        conf_dir.mkdir(parents=True, exist_ok=True)
        self.conf = conf_dir / "containers.conf"
        runc = shutil.which("runc") or "runc"
        self.conf.write_text(
            "[containers]\n"
            'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
            "[engine]\n"
            f'runtime = "{runc}"\n'
        )
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.conf)}

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        done = subprocess.run(["podman", *args], capture_output=True, text=True, env=self.env,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args)} failed: {done.stderr.strip()[-2000:]}")
        return done.stdout

    def inspect(self, name: str) -> dict[str, Any]:
        return json.loads(self("inspect", name))[0]

    def ensure_base_image(self) -> bool:
        """Debian 12 (python3 3.11, the version of the torch CPU wheel on this disk) with `python` and
        `pip` on PATH like python:3.11-slim; made once and kept. Returns whether it was made now."""
        if self._exists(BASE_IMAGE):
            return False
        with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
            rootfs = Path(tmp) / "rootfs"
            subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-pip,python3-venv,"
                            "ca-certificates", "bookworm", str(rootfs), DEBIAN_MIRROR],
                           check=True, capture_output=True, timeout=900)
            # The image is ours alone: pip may install into the system Python, as in python:3.11-slim.
            (rootfs / "usr/lib/python3.11/EXTERNALLY-MANAGED").unlink(missing_ok=True)
            (rootfs / "usr/local/bin/python").symlink_to("/usr/bin/python3")
            (rootfs / "usr/local/bin/pip").symlink_to("/usr/bin/pip3")
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            subprocess.run(["podman", "import", "-", BASE_IMAGE], stdin=tar.stdout, check=True,
                           capture_output=True, env=self.env, timeout=300)
            tar.wait()
        return True

    def _exists(self, image: str) -> bool:
        return subprocess.run(["podman", "image", "exists", image], env=self.env).returncode == 0

    def build_project_image(self, work: Path) -> None:
        """docker/Dockerfile on the local base image, installing from what this machine's pip uses."""
        pip_conf, mounts, torch_index = host_pip_settings(work)
        args = ["build", "-f", "docker/Dockerfile", "-t", IMAGE, "--build-arg", f"BASE={BASE_IMAGE}",
                "-v", f"{pip_conf}:/etc/pip.conf:ro"]
        for host_path, inside in mounts:
            args += ["-v", f"{host_path}:{inside}:ro"]
        if torch_index:
            args += ["--build-arg", f"TORCH_INDEX={torch_index}"]
        done = subprocess.run(["podman", *args, str(ROOT)], capture_output=True, text=True, env=self.env,
                              cwd=ROOT, timeout=1200)
        if done.returncode != 0:
            raise RuntimeError(f"podman build failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def host_pip_settings(work: Path) -> tuple[Path, list[tuple[str, str]], str | None]:
    """A pip.conf for the image build that uses what this machine's pip uses: its CA bundle (the package
    index is reached through a proxy that re-signs TLS with a CA only the host trusts) and its local
    wheel folders (where the torch CPU wheel lies). Returns the file, the (host, container) paths to
    mount read-only, and the index to take torch from (None: the Dockerfile's default)."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                            text=True).stdout
    settings: dict[str, str] = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        settings.setdefault(key.rsplit(".", 1)[-1], value.strip().strip("'\""))
    lines, mounts, torch_index = ["[global]"], [], None
    cert = settings.get("cert")
    if cert and Path(cert).is_file():
        lines.append("cert = /host-ca.crt")
        mounts.append((cert, "/host-ca.crt"))
    links = [p for p in settings.get("find-links", "").split() if Path(p).is_dir()]
    if links:
        lines.append("find-links = " + " ".join(links))
        mounts += [(p, p) for p in links]
        if any(Path(p).glob("torch-*+cpu-*.whl") for p in links):
            torch_index = "https://pypi.org/simple"  # the CPU wheel comes from the folder; PyPI has the rest
    work.mkdir(parents=True, exist_ok=True)
    conf = work / "pip.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf, mounts, torch_index


class Compose:
    """One compose project of docker/docker-compose.yml, unchanged, run with podman-compose.

    `settings` are WORKER_* variables the compose file passes through to every service."""

    def __init__(self, podman: Podman, project: str, settings: dict[str, str]) -> None:
        self.podman, self.project = podman, project
        self.env = {**podman.env, **settings}

    def __call__(self, *args: str, timeout: float = 300) -> str:
        argv = [compose_tool(), "-p", self.project, "-f", str(ROOT / "docker/docker-compose.yml"), *args]
        done = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=timeout, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"podman-compose {' '.join(args)} failed: {done.stderr.strip()[-2000:]}")
        return done.stdout

    def containers(self, service: str) -> list[str]:
        """The names of this project's containers of `service`, oldest first."""
        out = self.podman("ps", "-a", "--sort", "created", "--format", "{{.Names}}", "--filter",
                          f"label=io.podman.compose.project={self.project}", "--filter",
                          f"label=io.podman.compose.service={service}")
        return out.split()

    def volume(self, name: str) -> Path:
        """Where the named volume `name` of this project lies on the host (podman's local driver)."""
        return Path(self.podman("volume", "inspect", f"{self.project}_{name}", "--format", "{{.Mountpoint}}")
                    .strip())

    def gateway(self) -> str:
        """The host's address on this project's network: what containers reach a host process at."""
        [net] = json.loads(self.podman("network", "inspect", f"{self.project}_default"))
        return net["subnets"][0]["gateway"]

    def dump_logs(self, directory: Path) -> None:
        """Each container's output into directory/<name>.log, and its tail on stdout (shown on failure)."""
        directory.mkdir(parents=True, exist_ok=True)
        label = f"label=io.podman.compose.project={self.project}"
        for name in self.podman("ps", "-a", "--format", "{{.Names}}", "--filter", label).split():
            done = subprocess.run(["podman", "logs", name], capture_output=True, text=True,
                                  env=self.podman.env, timeout=30)
            text = done.stdout + done.stderr
            (directory / f"{name}.log").write_text(text)
            print(f"--- {name} (last lines)\n" + "\n".join(text.splitlines()[-15:]))

    def leftovers(self) -> dict[str, list[str]]:
        """What of this project still exists: container, volume and network ids."""
        label = f"label=io.podman.compose.project={self.project}"
        return {"containers": self.podman("ps", "-a", "-q", "--filter", label).split(),
                "volumes": self.podman("volume", "ls", "-q", "--filter", label).split(),
                "networks": self.podman("network", "ls", "-q", "--filter", label).split()}

    def down(self) -> None:
        """Remove every container, volume and network of this project (restarting ones too)."""
        label = f"label=io.podman.compose.project={self.project}"
        for _ in range(3):  # a container its restart policy brings back mid-removal is caught next time
            ids = self.podman("ps", "-a", "-q", "--filter", label).split()
            if ids:
                self.podman("rm", "-f", "--depend", "-t", "0", *ids, check=False)
            time.sleep(0.5)
        for kind in ("volume", "network"):
            ids = self.podman(kind, "ls", "-q", "--filter", label).split()
            if ids:
                self.podman(kind, "rm", "-f", *ids, check=False)
