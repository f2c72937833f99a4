"""The embedding cache: keys, storage, damaged entries, eviction, concurrency, use by DESSAM."""

import json
import multiprocessing as mp
import os

import cv2
import numpy as np
import pytest
import torch
from conftest import tiny_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from dessam_d2.data.mapper import DESSAMDatasetMapper
from dessam_d2.inference.annotate import boxes_to_masks
from dessam_d2.inference.images import predict_images
from dessam_d2.inference.predictor import Predictor
from dessam_d2.modeling.embedding_cache import EmbeddingCache
from dessam_d2.utils.hashing import module_fingerprint

SHAPE = (256, 4, 4)


def image(seed=0, size=(3, 32, 24)):
    return torch.randint(0, 256, size, generator=torch.Generator().manual_seed(seed)).to(
        torch.uint8
    )


def test_key_changes_with_every_part_and_only_with_them(tmp_path):
    cache = EmbeddingCache(str(tmp_path))
    key = cache.key(image(0), "longest256", 256, "f" * 40)
    assert key == cache.key(image(0).clone(), "longest256", 256, "f" * 40)
    flipped = image(0).flip(-1)
    assert key != cache.key(flipped, "longest256", 256, "f" * 40)
    assert key != cache.key(image(0), "longest256+hflip", 256, "f" * 40)
    assert key != cache.key(image(0), "longest256", 512, "f" * 40)
    assert key != cache.key(image(0), "longest256", 256, "e" * 40)
    assert key != cache.key(image(0).view(3, 24, 32), "longest256", 256, "f" * 40)
    assert key != EmbeddingCache(str(tmp_path), "float32").key(
        image(0), "longest256", 256, "f" * 40
    )


def test_put_returns_what_get_reads_in_the_storage_dtype(tmp_path):
    cache = EmbeddingCache(str(tmp_path), "float16")
    emb = torch.randn(SHAPE)
    assert cache.get("ab" * 20, SHAPE) is None
    stored = cache.put("ab" * 20, emb)
    assert stored.dtype == torch.float16 and torch.equal(stored, emb.half())
    assert torch.equal(cache.get("ab" * 20, SHAPE), stored)
    s = cache.stats()
    assert (s["hits"], s["misses"], s["writes"], s["entries"]) == (1, 1, 1, 1)
    assert s["size_gb"] > 0 and s["hit_rate"] == 0.5
    exact = EmbeddingCache(str(tmp_path / "f32"), "float32")
    assert torch.equal(exact.put("cd" * 20, emb), emb)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other_key", "wrong_shape"])
def test_a_damaged_entry_is_a_miss_and_is_rewritten(tmp_path, damage):
    cache = EmbeddingCache(str(tmp_path))
    key = "12" * 20
    cache.put(key, torch.randn(SHAPE))
    path = cache.path(key)
    if damage == "truncated":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif damage == "garbage":
        open(path, "wb").write(b"not a torch file")
    elif damage == "other_key":
        cache.put("34" * 20, torch.randn(SHAPE))
        os.replace(cache.path("34" * 20), path)
    else:
        torch.save({"key": key, "embedding": torch.zeros(2, 2, dtype=torch.float16)}, path)
    assert cache.get(key, SHAPE) is None
    assert cache.stats()["bad_entries"] == 1
    fresh = cache.put(key, torch.ones(SHAPE))
    assert torch.equal(cache.get(key, SHAPE), fresh)


def test_eviction_keeps_the_cap_and_drops_least_recently_used_first(tmp_path):
    entry = EmbeddingCache(str(tmp_path / "probe")).put("00" * 20, torch.randn(SHAPE))
    size = os.path.getsize(EmbeddingCache(str(tmp_path / "probe")).path("00" * 20))
    assert entry.numel() > 0
    cache = EmbeddingCache(str(tmp_path / "c"), max_gb=4.5 * size / 1024**3)
    keys = [f"{i:02d}" * 20 for i in range(1, 5)]
    for i, k in enumerate(keys):
        cache.put(k, torch.randn(SHAPE))
        os.utime(cache.path(k), (1000 + i, 1000 + i))  # distinct, increasing ages
    assert cache.get(keys[0], SHAPE) is not None  # the oldest becomes the most recent
    cache.put("99" * 20, torch.randn(SHAPE))  # 5 entries > 4.5: evict down to 0.9 * cap
    present = [k for k in keys + ["99" * 20] if os.path.exists(cache.path(k))]
    assert present == [keys[0], keys[2], keys[3], "99" * 20]
    assert cache.stats()["size_gb"] <= 0.9 * 4.5 * size / 1024**3
    assert cache.evictions == 1


def _writer(cache_dir, worker, rounds, queue):
    torch.set_num_threads(1)
    cache = EmbeddingCache(cache_dir)
    ok = True
    for r in range(rounds):
        for k in range(4):  # every worker writes the same 4 keys, with the same content
            key = f"{k:02d}" * 20
            got = cache.get(key, SHAPE)
            ok &= got is None or torch.equal(got, torch.full(SHAPE, float(k), dtype=got.dtype))
            cache.put(key, torch.full(SHAPE, float(k)))
        cache.put(f"{worker + 10:02d}{r + 20:02d}" * 10, torch.full(SHAPE, float(worker)))
    queue.put((ok, cache.bad_entries))


def test_several_processes_writing_at_once_never_expose_a_partial_entry(tmp_path):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 5, queue)) for w in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results == [(True, 0)] * 4  # every read saw a whole, right entry
    cache = EmbeddingCache(str(tmp_path))
    assert cache.stats()["entries"] == 4 + 4 * 5
    assert not [f for _, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".tmp")]


def test_fingerprint_sees_any_weight_change():
    m = torch.nn.Linear(3, 2)
    f = module_fingerprint(m)
    assert f == module_fingerprint(m)
    with torch.no_grad():
        m.weight[0, 0] += 1e-6
    assert f != module_fingerprint(m)


# ------------------------------------------------------------------------ in the model


def cached_model(cfg, tmp_path, seed=0):
    cfg.MODEL.DESSAM.EMBEDDING_CACHE_DIR = str(tmp_path)
    torch.manual_seed(seed)
    return build_model(cfg)


def count_encoder_calls(model):
    calls = []
    real = model.image_encoder.encode

    def spy(x):
        calls.append(len(x))
        return real(x)

    model.image_encoder.encode = spy
    return calls


def test_second_pass_reads_the_cache_and_gives_identical_results(cfg, tmp_path):
    from conftest import synthetic_input

    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    model = cached_model(cfg, tmp_path).eval()
    calls = count_encoder_calls(model)
    inp = synthetic_input(0)
    del inp["instances"]
    with torch.no_grad():
        first = model([inp])[0]["instances"]
        second = model([inp])[0]["instances"]
    assert calls == [1]
    assert model.embedding_cache.hits == 1 and model.embedding_cache.misses == 1
    assert len(first) > 0 and torch.equal(first.pred_masks, second.pred_masks)
    assert torch.equal(first.scores, second.scores)


def test_training_losses_identical_on_a_miss_and_on_a_hit(cfg, tmp_path):
    from conftest import synthetic_input

    losses = []
    for _ in range(2):  # a fresh model each time: the second one hits the first one's entries
        model = cached_model(cfg, tmp_path).train()
        torch.manual_seed(5)
        with EventStorage():
            losses.append({k: v.item() for k, v in model([synthetic_input(0)]).items()})
    assert model.embedding_cache.hits == 1 and model.embedding_cache.misses == 0
    assert losses[0] == losses[1]


def test_batch_with_hits_and_misses_encodes_only_the_misses(cfg, tmp_path):
    from conftest import synthetic_input

    model = cached_model(cfg, tmp_path).eval()
    calls = count_encoder_calls(model)
    a, b = synthetic_input(0), synthetic_input(1)
    images, _ = model.preprocess_image([a])
    emb_a = model.image_embeddings(images, [a])
    images, _ = model.preprocess_image([b, a])
    emb_ba = model.image_embeddings(images, [b, a])
    assert calls == [1, 1]
    assert torch.equal(emb_ba[1], emb_a[0])


def test_transform_and_new_encoder_weights_get_their_own_entries(cfg, tmp_path):
    from conftest import synthetic_input

    model = cached_model(cfg, tmp_path).eval()
    calls = count_encoder_calls(model)
    inp = synthetic_input(0)
    images, _ = model.preprocess_image([inp])
    model.image_embeddings(images, [dict(inp, sam_transform="longest256")])
    model.image_embeddings(images, [dict(inp, sam_transform="longest256")])
    model.image_embeddings(images, [dict(inp, sam_transform="longest256+hflip")])
    assert calls == [1, 1]
    state = model.image_encoder.encoder.state_dict()
    state["neck.0.weight"] = state["neck.0.weight"] + 0.01
    model.image_encoder.encoder.load_state_dict(state)  # e.g. a SAM checkpoint loaded later
    model.image_embeddings(images, [dict(inp, sam_transform="longest256")])
    assert calls == [1, 1, 1]


def test_no_cache_for_a_trained_encoder(cfg, tmp_path):
    cfg.MODEL.SAM.FREEZE_ENCODER = False
    model = cached_model(cfg, tmp_path)
    assert model.embedding_cache is None


def test_an_image_evaluated_once_is_a_hit_in_prediction_and_annotation(tmp_path):
    """Evaluation (the test mapper), predict.py and boxes_to_masks.py build the model input with
    one function, so they share cache entries: one miss in evaluation, then hits only."""
    cfg = tiny_cfg(**{"MODEL.DESSAM.EMBEDDING_CACHE_DIR": str(tmp_path / "cache")})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    cache = model.embedding_cache
    rgb = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), rgb[..., ::-1])
    record = {"file_name": str(tmp_path / "a.png"), "image_id": 1, "height": 96, "width": 128}

    with torch.no_grad():
        model([DESSAMDatasetMapper(cfg, is_train=False)(record)])  # what evaluation runs
    assert (cache.hits, cache.misses, cache.writes) == (0, 1, 1)

    predict_images(Predictor(model), [record["file_name"]], str(tmp_path / "out"), progress=False)
    assert (cache.hits, cache.misses, cache.writes) == (1, 1, 1)

    coco = {
        "images": [{"id": 1, "file_name": "a.png", "height": 96, "width": 128}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 20, 30, 25]}],
    }
    (tmp_path / "boxes.json").write_text(json.dumps(coco))
    boxes_to_masks(
        Predictor(model),
        str(tmp_path / "boxes.json"),
        str(tmp_path),
        str(tmp_path / "masks.json"),
        progress=False,
    )
    assert (cache.hits, cache.misses, cache.writes) == (2, 1, 1)
