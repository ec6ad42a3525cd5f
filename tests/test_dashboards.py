"""Dashboards: TensorBoard event files read back record by record (length, masked CRC-32C, payload, masked CRC-32C)
and decoded; --wandb without wandb says so in one line and the run goes on."""
import struct
from types import SimpleNamespace

from nanojax import dashboards


def read_records(path):
    data, records, at = path.read_bytes(), [], 0
    while at < len(data):
        header = data[at:at + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[at + 8:at + 12])[0] == dashboards.masked_crc(header)
        payload = data[at + 12:at + 12 + length]
        assert struct.unpack("<I", data[at + 12 + length:at + 16 + length])[0] == dashboards.masked_crc(payload)
        records.append(payload)
        at += 16 + length
    assert at == len(data)
    return records


def parse(buf):
    """A minimal protobuf reader: {field number: [values]}; length-delimited values stay bytes."""
    fields, at = {}, 0

    def varint():
        nonlocal at
        shift = result = 0
        while True:
            byte = buf[at]
            at += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result
    while at < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire == 1:
            value, at = struct.unpack("<d", buf[at:at + 8])[0], at + 8
        elif wire == 5:
            value, at = struct.unpack("<f", buf[at:at + 4])[0], at + 4
        else:
            n = varint()
            value, at = buf[at:at + n], at + n
        fields.setdefault(number, []).append(value)
    return fields


def test_crc32c_known_answer():
    assert dashboards.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert dashboards.crc32c(b"") == 0


def test_tensorboard_events_read_back(tmp_path, capsys):
    cfg = SimpleNamespace(tensorboard=str(tmp_path / "tb"), wandb=False)
    logger = dashboards.open_dashboards(cfg, "base-d4")
    logger.log(1, {"loss": 2.5, "val_bpb": None, "mfu": float("nan"), "note": "text", "lr": 1})
    logger.log(2, {"loss": 2.25})
    logger.log(3, {})
    logger.close()
    files = list((tmp_path / "tb" / "base-d4").glob("events.out.tfevents.*"))
    assert len(files) == 1 and "tensorboard --logdir" in capsys.readouterr().out
    events = [parse(r) for r in read_records(files[0])]
    assert events[0][3] == [b"brain.Event:2"] and events[0][2] == [0]
    got = []
    for event in events[1:]:
        for value in parse(event[5][0])[1]:
            v = parse(value)
            got.append((event[2][0], v[1][0].decode(), v[2][0]))
        assert event[1][0] > 1.7e9  # wall time, seconds
    assert got == [(1, "loss", 2.5), (1, "lr", 1.0), (2, "loss", 2.25)]  # None, nan and text left out; {} no record


def test_wandb_missing_is_one_line_and_no_dashboard(capsys, monkeypatch):
    monkeypatch.setattr(dashboards, "wandb_ready", lambda: (None, "wandb is not installed (pip install wandb)"))
    logger = dashboards.open_dashboards(SimpleNamespace(tensorboard="", wandb=True), "base-d4")
    logger.log(1, {"loss": 1.0})
    logger.close()
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["--wandb: wandb is not installed (pip install wandb); going on without it"]
    assert dashboards.open_dashboards(SimpleNamespace(tensorboard="", wandb=False), "x").sinks == []


def test_wandb_needs_a_key(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace())
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert dashboards.wandb_ready()[1].startswith("wandb is not logged in")
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password x\n")
    assert dashboards.wandb_ready()[1] == ""
