"""Live dashboards where the user already has them, never required: Weights & Biases (`--wandb`, when wandb is
installed and logged in) and TensorBoard event files (`--tensorboard DIR`, written here with no dependency).

    logger = open_dashboards(cfg, run_name)     # cfg: anything with .wandb and .tensorboard (TrainConfig)
    logger.log(step, {"loss": 2.3, "val_bpb": None})   # numbers only; None and non-numbers are left out
    logger.close()

TensorBoard's event file is a TFRecord stream of `Event` protocol buffers: each record is the payload's length
(uint64, little-endian), the masked CRC-32C of those 8 bytes, the payload, the masked CRC-32C of the payload.
"""
from __future__ import annotations

import dataclasses
import math
import os
import socket
import struct
import time
from pathlib import Path

from nanojax.common import is_main_process, print0

# ----------------------------------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), as TFRecord masks it.

_CRC_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------------------------------
# The few protocol-buffer fields an Event needs: Event{wall_time=1 double, step=2 int64, file_version=3 string,
# summary=5 Summary}, Summary{value=1 repeated Value}, Value{tag=1 string, simple_value=2 float}.

def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    key = _varint(number << 3 | wire)
    if wire == 2:  # length-delimited
        return key + _varint(len(payload)) + payload
    return key + payload


def event_bytes(wall_time: float, step: int, *, file_version: str | None = None, scalars: dict | None = None) -> bytes:
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        out += _field(3, 2, file_version.encode())
    if scalars:
        values = b"".join(_field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", value)))
                          for tag, value in scalars.items())
        out += _field(5, 2, values)
    return out


def record_bytes(payload: bytes) -> bytes:
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", masked_crc(length)) + payload + struct.pack("<I", masked_crc(payload))


class TensorBoardWriter:
    """Scalars into DIR/events.out.tfevents.<time>.<host>; flushed every record so a killed run keeps what it logged."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self._f = open(self.path, "ab")
        self._write(event_bytes(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, payload: bytes):
        self._f.write(record_bytes(payload))
        self._f.flush()

    def log(self, step: int, metrics: dict):
        if metrics:
            self._write(event_bytes(time.time(), step, scalars=metrics))

    def close(self):
        self._f.close()


# ----------------------------------------------------------------------------------------------------------------------
# Weights & Biases, only when it is installed and has a key.

def wandb_ready() -> tuple[object | None, str]:
    """(the wandb module, "") when usable; (None, why not) otherwise. Never prompts for a login."""
    try:
        import wandb
    except ImportError:
        return None, "wandb is not installed (pip install wandb, then wandb login)"
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return wandb, ""
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace"):
        return wandb, ""
    return None, "wandb is not logged in (run `wandb login`, or set WANDB_API_KEY)"


class Dashboards:
    """Sends each step's numbers to every dashboard that was opened; does nothing when none was."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def log(self, step: int, metrics: dict):
        numbers = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        for sink in self.sinks:
            sink.log(step, numbers)

    def close(self):
        for sink in self.sinks:
            sink.close()
        self.sinks = []


class _WandbRun:
    def __init__(self, wandb, run_name: str, config: dict):
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "nanojax"), name=run_name, config=config)

    def log(self, step: int, metrics: dict):
        self.run.log(metrics, step=step)

    def close(self):
        self.run.finish()


def open_dashboards(cfg, run_name: str, *, tensorboard_root=None) -> Dashboards:
    """The dashboards cfg asks for (cfg.wandb: bool, cfg.tensorboard: a folder or ""), on process 0 only. A dashboard
    that cannot open says so in one line and the run goes on without it. TensorBoard files go to
    <tensorboard>/<run_name>/, so runs sit side by side in one `tensorboard --logdir <tensorboard>`."""
    sinks = []
    if not is_main_process():
        return Dashboards(sinks)
    if getattr(cfg, "tensorboard", ""):
        folder = Path(tensorboard_root or cfg.tensorboard) / run_name
        try:
            sinks.append(TensorBoardWriter(folder))
            print0(f"tensorboard: writing {folder} (tensorboard --logdir {folder.parent})")
        except OSError as e:
            print0(f"tensorboard: cannot write {folder} ({e.strerror or e}); going on without it")
    if getattr(cfg, "wandb", False):
        wandb, why = wandb_ready()
        if wandb is None:
            print0(f"--wandb: {why}; going on without it")
        else:
            config = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {}
            try:
                sinks.append(_WandbRun(wandb, run_name, config))
            except Exception as e:  # a network or account problem must not stop training
                print0(f"--wandb: could not start a run ({type(e).__name__}: {str(e)[:160]}); going on without it")
    return Dashboards(sinks)
