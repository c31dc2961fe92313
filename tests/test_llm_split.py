"""Exactness: the split model, over a real loopback server, reproduces the unsplit model.

For every supported family, built small from its config: greedy token ids equal those
of transformers' own `generate()`, and the logits of every step match to 1e-4 (fp32),
for splits including X=0, X=Y and Y=N.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lambdasplit.client import DeviceModel, RemoteBody, Sampling
from lambdasplit.client.run import run_generation
from lambdasplit.errors import SplitError, UnsupportedModelError
from lambdasplit.llm import Checkpoint, load_body, load_head, load_tail
from lambdasplit.server import BodyServer, BodyService, CloudService
from tiny_models import FAMILIES

SPLITS = [(0, 2), (2, 4), (3, 3), (4, 6)]  # X=0, a middle body, an empty body (X=Y), Y=N
NEW_TOKENS = 24  # > the tiny models' sliding windows once the prompt is added
PROMPT = "The quick brown fox jumps over the lazy dog and keeps running"


def reference(folder, prompt_ids, new_tokens, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    out = model.generate(
        torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )
    return out.sequences[0, len(prompt_ids):].tolist(), torch.stack(out.logits)[:, 0]


@pytest.fixture(scope="module")
def family_servers(tiny_model_dir):
    """One in-process server per family hosting every body of SPLITS: real sockets, shared by the tests."""
    servers = {}
    for family in FAMILIES:
        folder = tiny_model_dir(family)
        services = [BodyService(str(folder), f"{x}:{y}") for x, y in SPLITS] + [CloudService(str(folder))]
        servers[family] = (folder, BodyServer(services).start_in_thread())
    yield servers
    for _, server in servers.values():
        server.stop()


@pytest.mark.parametrize("family", FAMILIES)
def test_split_matches_unsplit_generate(family, family_servers):
    folder, server = family_servers[family]
    checkpoint = Checkpoint(str(folder))
    device_whole = DeviceModel.load(checkpoint)
    prompt_ids = device_whole.encode(PROMPT, chat=False)
    ref_ids, ref_logits = reference(folder, prompt_ids, NEW_TOKENS)
    assert len(set(ref_ids)) > 3, "the tiny model collapsed; the comparison would prove little"
    for x, y in SPLITS:
        device = DeviceModel.load(checkpoint, (x, y))
        with RemoteBody.for_device(device, server.address) as body:
            result = device.generate(prompt_ids, body=body, max_new_tokens=NEW_TOKENS, ignore_eos=True, keep_logits=True)
        assert result.token_ids == ref_ids, f"{family} split {x}:{y}"
        logits = torch.stack(result.logits)
        eos = list(device.eos_ids)
        logits[:, eos] = ref_logits[:, eos]  # both sides mask EOS to -inf (min_new_tokens); compare the rest
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_same_seed_same_tokens_in_every_mode(family, family_servers):
    folder, server = family_servers[family]
    sampling = Sampling(temperature=0.9, top_k=40, top_p=0.95, seed=7)
    records = [
        run_generation(model=str(folder), mode=mode, prompt=PROMPT, max_new_tokens=16, split="2:4",
                       server=server.address, sampling=sampling, ignore_eos=True, chat=False)
        for mode in ("local", "split", "cloud")
    ]
    assert records[0]["token_ids"] == records[1]["token_ids"] == records[2]["token_ids"]
    assert records[0]["text"] == records[1]["text"] == records[2]["text"]
    assert records[0]["bytes_up"] == 0 and records[1]["round_trips"] == 16 and records[2]["round_trips"] == 1


def test_cache_none_gives_the_same_tokens(family_servers):
    folder, server = family_servers["mistral"]
    kv, none = (run_generation(model=str(folder), mode="split", prompt=PROMPT, max_new_tokens=20, split="2:4",
                               server=server.address, cache=cache, ignore_eos=True, chat=False)
                for cache in ("kv", "none"))
    assert kv["token_ids"] == none["token_ids"]
    assert none["bytes_up"] > 5 * kv["bytes_up"]


@pytest.mark.parametrize("family", FAMILIES)
def test_steps_of_several_positions_and_cut_back(tiny_model_dir, family):
    """A step can carry k positions, and a cache can be cut back, past a sliding window too
    (30 positions, window 16, back to 12): what speculative decoding and replay need."""
    folder = tiny_model_dir(family)
    head, body, tail = load_head(str(folder), 2), load_body(str(folder), 2, 4), load_tail(str(folder), 4)
    ids = torch.randint(0, 400, (1, 30), generator=torch.Generator().manual_seed(0))

    def run(chunks):
        outs, start = [], 0
        for n in chunks:
            piece = ids[:, start:start + n]
            outs.append(tail.forward(body.forward(head.forward(piece, start), start), start, last_only=False))
            start += n
        return torch.cat(outs, dim=1)

    whole = run([30])
    torch.testing.assert_close(run([10, 1, 5, 14]), whole, atol=1e-4, rtol=0)
    # Cut every cache back to 12 positions, then continue from there: same logits as before.
    for stack in (head.stack, body.stack, tail.stack):
        stack.truncate(12)
    rest = tail.forward(body.forward(head.forward(ids[:, 12:], 12), 12), 12, last_only=False)
    torch.testing.assert_close(rest, whole[:, 12:], atol=1e-4, rtol=0)


def test_unsupported_family_is_refused_by_name(tmp_path):
    from transformers import BloomConfig  # (Granite, refused before issue 17, is now split exactly)

    config = BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="bloom"):
        load_body(str(tmp_path), 0, 1)


def test_invalid_split_is_refused(tiny_model_dir):
    folder = tiny_model_dir("llama")
    for split in ("4:2", "0:7", "a:b"):
        with pytest.raises(SplitError):
            DeviceModel.load(str(folder), split)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("dtype,codec", [("bfloat16", "bf16"), ("float16", "fp16")])
def test_half_precision_split_matches_unsplit_in_that_dtype(family, dtype, codec, tiny_model_dir):
    """--dtype applies to both sides; with a codec that keeps that dtype, split equals the unsplit
    transformers model loaded with `from_pretrained(dtype=...)`: same tokens, same logits."""
    folder = tiny_model_dir(family)
    checkpoint = Checkpoint(str(folder))
    prompt_ids = DeviceModel.load(checkpoint).encode(PROMPT, chat=False)
    ref_ids, ref_logits = reference(folder, prompt_ids, 12, dtype=getattr(torch, dtype))
    with BodyServer([BodyService(str(folder), "2:4", dtype=dtype)]) as server:
        device = DeviceModel.load(checkpoint, (2, 4), dtype)
        with RemoteBody.for_device(device, server.address, codec=codec) as body:
            split = device.generate(prompt_ids, body=body, max_new_tokens=12, ignore_eos=True, keep_logits=True)
    assert split.token_ids == ref_ids
    logits = torch.stack(split.logits).float()
    eos = list(device.eos_ids)
    logits[:, eos] = ref_logits[:, eos].float()
    torch.testing.assert_close(logits, ref_logits.float(), atol=0, rtol=0)


def test_body_spread_over_two_servers(tiny_model_dir):
    """A session with several servers: layers [1, 3) on one, [3, 5) on another."""
    from lambdasplit.client import BodyChain

    folder = str(tiny_model_dir("qwen2"))
    checkpoint = Checkpoint(folder)
    device = DeviceModel.load(checkpoint, (1, 5))
    prompt_ids = device.encode(PROMPT, chat=False)
    with BodyServer([BodyService(folder, "1:3")]) as first, BodyServer([BodyService(folder, "3:5")]) as second:
        with RemoteBody(first.address, fingerprint=checkpoint.fingerprint, split=(1, 3)) as a, \
                RemoteBody(second.address, fingerprint=checkpoint.fingerprint, split=(3, 5)) as b:
            chained = device.generate(prompt_ids, body=BodyChain([a, b]), max_new_tokens=20, ignore_eos=True)
    local = DeviceModel.load(checkpoint).generate(prompt_ids, max_new_tokens=20, ignore_eos=True)
    assert chained.token_ids == local.token_ids


def test_sharded_checkpoint_loads_selectively_with_one_fingerprint(tiny_model_dir, tmp_path):
    """A Hub-style sharded checkpoint: each side reads only its shards, and both sides
    compute the same fingerprint whatever shards they hold (a server never fetches the
    embedding's shard just to agree on the model)."""
    import shutil

    folder = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / name, sharded / name)
    full = Checkpoint(str(sharded))
    shards = sorted(set(full._weight_map.values()))
    assert len(shards) > 3

    # The body side: a copy without the shards that hold the embedding, norm and LM head.
    body_only = tmp_path / "body-only"
    shutil.copytree(sharded, body_only)
    device_tensors = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
    body_shards = {f for n, f in full._weight_map.items() if n.startswith(("model.layers.2.", "model.layers.3."))}
    removed = {full._weight_map[name] for name in device_tensors} - body_shards
    for shard in removed:
        (body_only / shard).unlink()
    assert removed
    body_checkpoint = Checkpoint(str(body_only))
    assert body_checkpoint.fingerprint == full.fingerprint == Checkpoint(str(sharded)).fingerprint

    prompt_ids = DeviceModel.load(full).encode(PROMPT, chat=False)
    with BodyServer([BodyService(str(body_only), "2:4")]) as server:
        device = DeviceModel.load(full, (2, 4))
        with RemoteBody.for_device(device, server.address) as body:
            split = device.generate(prompt_ids, body=body, max_new_tokens=12, ignore_eos=True)
    local = DeviceModel.load(str(folder)).generate(prompt_ids, max_new_tokens=12, ignore_eos=True)
    assert split.token_ids == local.token_ids


def test_hub_checkpoint_fetches_only_the_shards_a_side_runs(tiny_model_dir, tmp_path, monkeypatch):
    """A Hub id: each side downloads the small files, then only the weight shards it runs.

    There is no network here, so the three huggingface_hub calls lambdasplit makes are
    served from a local folder laid out as a Hub repository; what is under test is which
    files each side asks for, and that both agree on the fingerprint.
    """
    import fnmatch
    import shutil

    import huggingface_hub

    folder = tiny_model_dir("llama")
    repo = tmp_path / "repo"
    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).save_pretrained(repo, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / name, repo / name)
    fetched: dict[str, list[str]] = {}

    def fake_snapshot_download(repo_id, allow_patterns):
        snapshot = tmp_path / "cache" / repo_id.replace("/", "--") / "snapshots" / "0123abcd"
        snapshot.mkdir(parents=True, exist_ok=True)
        for file in repo.iterdir():
            if any(fnmatch.fnmatch(file.name, pattern) for pattern in allow_patterns):
                shutil.copy(file, snapshot / file.name)
        return str(snapshot)

    def fake_hf_hub_download(repo_id, filename, revision):
        assert revision == "0123abcd"
        fetched.setdefault(repo_id, []).append(filename)
        target = tmp_path / "cache" / repo_id.replace("/", "--") / "snapshots" / revision / filename
        shutil.copy(repo / filename, target)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)

    server_side, device_side = Checkpoint("org/server-copy"), Checkpoint("org/device-copy")
    assert not fetched  # nothing but small files until a side loads what it runs
    assert server_side.fingerprint == device_side.fingerprint
    load_body(server_side, 2, 4)
    DeviceModel.load(device_side, (2, 4))
    weight_map = server_side._weight_map
    in_body = lambda name: name.startswith(("model.layers.2.", "model.layers.3."))  # noqa: E731
    body_shards = {weight_map[name] for name in weight_map if in_body(name)}
    device_shards = {weight_map[name] for name in weight_map if not in_body(name)}
    assert set(fetched["org/server-copy"]) == body_shards
    assert set(fetched["org/device-copy"]) == device_shards
    assert weight_map["model.embed_tokens.weight"] not in body_shards  # the server never holds the table
