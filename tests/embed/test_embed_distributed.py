import pytest

from openpluto.embed.distributed import DistInfo, gather_objects, init_distributed, shard


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("weighted", [False, True])
def test_shard_partitions_items(world, weighted):
    items = [f"s{i}" for i in range(11)]
    weights = [float((i * 7) % 5 + 1) for i in range(11)] if weighted else None
    parts = [shard(items, r, world, weights) for r in range(world)]
    flat = [x for p in parts for x in p]
    assert sorted(flat) == sorted(items) and len(flat) == len(items)
    assert all(p == [x for x in items if x in p] for p in parts)  # order kept within a rank
    if weighted:
        loads = [sum(weights[items.index(x)] for x in p) for p in parts]
        assert max(loads) - min(loads) <= max(weights)
    else:
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_single_process_defaults(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = init_distributed("cpu")
    assert info == DistInfo() and info.is_main and not info.distributed
    assert gather_objects({"a": 1}, info) == [{"a": 1}]
