"""`lambdasplit check`: does the split reproduce the unsplit model, for this checkpoint?

For each split X:Y and each input (random token ids, and real text through the model's own
tokenizer when it has one), both sides decode greedily from the same prompt:

    reference  the unsplit transformers model, `from_pretrained(dtype=...)`, and its own
               `generate()` (the prompt in one forward, then one token per forward)
    split      head [0, X) -> body [X, Y) -> tail [Y, N), loaded selectively by lambdasplit,
               the same steps

and we report the largest logit difference up to the first diverging token, and that token's
index. A split is exact when no token diverges and the difference is within tolerance (1e-4 in
float32; 0, bit-equal, in bfloat16 / float16). The body runs in this process: this checks the
arithmetic of the adapter and the loader, not the network (tests/test_families.py does that).

An unknown family found exact through an existing adapter (`--as-family F`) is recorded for its
architecture (llm/families.py `record_check`): serve, generate and the gateway accept it from then on.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lambdasplit.errors import LambdaSplitError, UsageError
from lambdasplit.llm.checkpoint import Checkpoint, parse_dtype
from lambdasplit.llm.families import FAMILIES, Family, check_config, family_for, record_check
from lambdasplit.llm.segments import load_body, load_head, load_tail, parse_split

REAL_TEXT = Path(__file__).resolve().parents[1] / "zoo" / "data" / "kjv_slice.txt"
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.0, torch.float16: 0.0}


@dataclass
class CheckResult:
    split: str
    inputs: str  # "random" or "real"
    max_logit_diff: float  # over the steps up to and including the first diverging one
    first_diverging_token: int | None  # index among the generated tokens; None if all agree
    new_tokens: int
    exact: bool


def default_splits(n: int) -> list[tuple[int, int]]:
    """X=0, a middle body, an empty body (X=Y) and Y=N."""
    half = n // 2
    return sorted({(0, half), (n // 3, max(n // 3, (2 * n) // 3)), (half, half), (half, n)})


def prompts(checkpoint: Checkpoint, length: int, seed: int) -> dict[str, list[int]]:
    vocab = checkpoint.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(seed)
    found = {"random": torch.randint(0, vocab, (length,), generator=generator).tolist()}
    if not any((checkpoint.folder / name).exists() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return found  # a config-only checkpoint has no tokenizer: random ids only
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint.folder)
    ids = tokenizer(REAL_TEXT.read_text(encoding="utf-8")[:4000])["input_ids"][:length]
    if ids and max(ids) < vocab:
        found["real"] = ids
    return found


@torch.inference_mode()
def reference_decode(model, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """The unsplit model's own generate(), greedy, with none of the checkpoint's generation defaults
    (a repetition penalty in generation_config.json would make its tokens differ from plain argmax)."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(pad_token_id=0, eos_token_id=None)  # never stop early
    out = model.generate(
        torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        max_new_tokens=new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True,
    )
    return out.sequences[0, len(prompt_ids):].tolist(), [step[0].float() for step in out.logits]


@torch.inference_mode()
def split_decode(head, body, tail, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    ids, logits, start, step = list(prompt_ids), [], 0, list(prompt_ids)
    for _ in range(new_tokens):
        hidden = body.forward(head.forward(torch.tensor([step]), start), start)
        last = tail.forward(hidden, start)[0, -1].float()
        logits.append(last)
        ids.append(int(torch.argmax(last)))
        start, step = len(ids) - 1, [ids[-1]]
    return ids[len(prompt_ids):], logits


def compare(split: str, inputs: str, reference, split_run, tolerance: float) -> CheckResult:
    (ref_ids, ref_logits), (ids, logits) = reference, split_run
    diverging = next((i for i, (a, b) in enumerate(zip(ref_ids, ids)) if a != b), None)
    last = len(ids) if diverging is None else diverging + 1
    diffs = [(a - b).abs().max().item() for a, b in zip(ref_logits[:last], logits[:last])]
    worst = max(diffs, default=0.0)
    if any(d != d for d in diffs):  # NaN: one side produced NaN where the other did not
        worst = float("inf")
    return CheckResult(split, inputs, worst, diverging, len(ids), diverging is None and worst <= tolerance)


def _random_checkpoint(model: str, seed: int, folder: Path) -> str:
    """Save `model`'s config with seeded random weights (and its tokenizer files, if any) into `folder`."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from lambdasplit.llm.checkpoint import _local_folder

    source, _ = _local_folder(model)
    config = AutoConfig.from_pretrained(source)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    for file in source.iterdir():
        if file.is_file() and file.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(file, folder / file.name)
    return str(folder)


def run_check(model: str, splits: list[str] | None = None, dtype: str = "float32", *, random_weights: bool = False,
              as_family: str | None = None, new_tokens: int = 16, prompt_tokens: int = 24, seed: int = 0,
              atol: float | None = None) -> dict:
    """Check every split of `model`; returns the report that `check --json` prints."""
    torch_dtype = parse_dtype(dtype)
    if new_tokens < 1 or prompt_tokens < 1:
        raise UsageError("--new-tokens and --prompt-tokens must be at least 1")
    with tempfile.TemporaryDirectory(prefix="lambdasplit-check-") as scratch:
        if random_weights:
            from transformers import AutoConfig

            from lambdasplit.llm.checkpoint import _local_folder

            config = AutoConfig.from_pretrained(_local_folder(model)[0])
            _family(config, as_family)  # refuse before building random weights
            model = _random_checkpoint(model, seed, Path(scratch))
        checkpoint = Checkpoint(model)
        family = _family(checkpoint.config, as_family)
        n = checkpoint.config.num_hidden_layers
        chosen = [parse_split(s, n) for s in splits] if splits else default_splits(n)
        tolerance = TOLERANCE[torch_dtype] if atol is None else atol

        from transformers import AutoModelForCausalLM

        reference_model = AutoModelForCausalLM.from_pretrained(checkpoint.folder, dtype=torch_dtype).eval()
        inputs = prompts(checkpoint, prompt_tokens, seed)
        references = {name: reference_decode(reference_model, ids, new_tokens) for name, ids in inputs.items()}
        del reference_model
        results = []
        for x, y in chosen:
            try:
                head = load_head(checkpoint, x, torch_dtype, family)
                body = load_body(checkpoint, x, y, torch_dtype, family)
                tail = load_tail(checkpoint, y, torch_dtype, head=head, family=family)
            except (AttributeError, KeyError) as error:  # an adapter asked for with --as-family that does not fit
                raise LambdaSplitError(f"the {family.model_type} adapter does not fit this model: {error}") from None
            for name, ids in inputs.items():
                fresh = (head.fork(), body.fork(), tail.fork())  # empty caches for every run
                results.append(compare(f"{x}:{y}", name, references[name], split_decode(*fresh, ids, new_tokens),
                                       tolerance))
    report = {
        "model": checkpoint.name if not random_weights else f"{checkpoint.config.model_type} (random weights)",
        "model_type": checkpoint.config.model_type, "adapter": family.model_type, "dtype": dtype,
        "tolerance": tolerance, "layers": n, "exact": all(r.exact for r in results),
        "results": [asdict(r) for r in results], "recorded": None,
    }
    if report["exact"] and checkpoint.config.model_type not in FAMILIES:  # an adapter tried with --as-family
        report["recorded"] = str(record_check(checkpoint.config, family, report))
    return report


def _family(config, as_family: str | None) -> Family:
    if as_family is None:
        return family_for(config)
    if as_family not in FAMILIES:
        raise UsageError(f"unknown adapter {as_family!r}; choose one of {', '.join(FAMILIES)}")
    family = FAMILIES[as_family]
    check_config(family, config)
    try:
        family_for(config)  # still refuse hybrids by name, whatever adapter is asked for
    except LambdaSplitError as error:
        if "is refused" in str(error):
            raise
    return family
