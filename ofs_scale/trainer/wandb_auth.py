"""wandb's naming and credentials, decided before wandb starts.

`logging.wandb=online` without credentials makes `wandb.init` prompt or fail deep inside wandb
with a long traceback, after the job has waited in the queue. `missing_wandb_login` looks where
wandb looks (the WANDB_API_KEY variable, an identity-token file, or a netrc entry for the wandb
host: $NETRC, ~/.netrc, ~/_netrc) and says in one line what to do; the dry run and the Trainer's
start both call it.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_HOST = "https://api.wandb.ai"


def _netrc_path() -> Path:
    if env := os.environ.get("NETRC"):
        return Path(env).expanduser()
    for name in ("~/.netrc", "~/_netrc"):
        if (path := Path(name).expanduser()).exists():
            return path
    return Path("~/.netrc").expanduser()


def _wandb_host() -> str:
    """The host wandb authenticates against (WANDB_BASE_URL, else api.wandb.ai)."""
    return urlsplit(os.environ.get("WANDB_BASE_URL") or DEFAULT_HOST).netloc


def has_wandb_login() -> bool:
    """Whether wandb would find credentials without asking (env, identity token or netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    if (token := os.environ.get("WANDB_IDENTITY_TOKEN_FILE")) and Path(token).is_file():
        return True
    try:
        entry = netrc.netrc(str(_netrc_path())).authenticators(_wandb_host())
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def missing_wandb_login(mode: str) -> str | None:
    """The one-line problem of `logging.wandb=<mode>` on this machine, or None."""
    if mode != "online" or has_wandb_login():
        return None
    return (
        "logging.wandb=online but no wandb API key was found (WANDB_API_KEY, or a netrc entry "
        f"for {_wandb_host()} in "
        f"{_netrc_path()}); run `wandb login` (or export WANDB_API_KEY) on this machine, or set "
        "logging.wandb=offline and `wandb sync` the run later"
    )


def wandb_run_name(name: str, out_dir: str) -> str:
    """The wandb run name: `run.name`, plus the out_dir's last component when that differs,
    so runs that share a YAML but not an out_dir (sweeps, branches, reruns) are told apart."""
    base = Path(out_dir).expanduser().name
    return name if not base or base == name else f"{name}/{base}"
