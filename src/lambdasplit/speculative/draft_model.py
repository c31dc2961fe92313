"""`--speculate draft`: a small Hugging Face causal LM on the device proposes the drafts.

It must share the target's tokenizer (the same vocabulary, token for token: checked at
load). It keeps its own KV cache over the committed text and crops it back to what
the target accepted. Greedy (or with a greedy sampler) it drafts its argmax; with a
sampling sampler it samples from its own distribution processed like the target's
(temperature, top-k, top-p) and hands that distribution to the acceptance rule.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from lambdasplit.client.generation import Sampler, Sampling
from lambdasplit.errors import UsageError
from lambdasplit.speculative.sources import Draft, Step


class DraftModelSource:
    name = "draft"

    def __init__(self, model, vocab_size: int, sampler: Sampler | None = None):
        self.model = model.eval()
        self.vocab_size = vocab_size  # the target's; the draft's logits are cut or padded to it
        self.sampler = sampler
        self.ids: list[int] = []  # tokens in self.cache
        self.cache = DynamicCache(config=self.model.config)

    @classmethod
    def load(cls, name: str, device, sampling: Sampling | None = None, sampler=None) -> "DraftModelSource":
        from lambdasplit.zoo import resolve

        folder = resolve(name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=device.dtype)
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot load the draft model {name!r}: {error}") from None
        if device is not None and tokenizer.get_vocab() != device.tokenizer.get_vocab():
            raise UsageError(f"the draft model {name!r} does not share the model's tokenizer; "
                             "speculation needs the same token ids on both")
        if sampler is None and sampling is not None:
            # its own stream (seed + 1): draws independent of the target's acceptance draws
            sampler = Sampler(Sampling(**{**sampling.to_dict(), "seed": sampling.seed + 1}))
        vocab = device.checkpoint.config.vocab_size if device is not None else model.config.vocab_size
        return cls(model, vocab, sampler)

    @torch.inference_mode()
    def _logits(self, sequence: list[int]) -> torch.Tensor:
        """Next-token logits after `sequence`, feeding only what the cache lacks."""
        common = 0
        for a, b in zip(self.ids, sequence):
            if a != b:
                break
            common += 1
        common = min(common, len(sequence) - 1)  # feed at least one token to get logits
        cached = self.cache.get_seq_length()
        if common < cached:
            try:
                self.cache.crop(-(cached - common))  # transformers 5: a negative count removes positions
            except (RuntimeError, ValueError):  # a cache layer that cannot cut back: start over
                self.cache, common = DynamicCache(config=self.model.config), 0
        new = sequence[common:]
        positions = torch.arange(common, len(sequence)).unsqueeze(0)
        out = self.model(input_ids=torch.tensor([new]), past_key_values=self.cache, use_cache=True,
                         position_ids=positions, logits_to_keep=1)
        self.cache = out.past_key_values
        self.ids = list(sequence)
        logits = out.logits[0, -1].float()
        if logits.numel() < self.vocab_size:
            logits = torch.cat([logits, torch.full((self.vocab_size - logits.numel(),), float("-inf"))])
        return logits[:self.vocab_size]

    def propose(self, sequence: list[int], k: int) -> Draft:
        tokens, rows = [], []
        sampling = self.sampler is not None and not self.sampler.greedy
        context = list(sequence)
        for _ in range(k):
            logits = self._logits(context)
            if sampling:
                probs = self.sampler.probs(logits)
                token = self.sampler.draw(probs)
                rows.append(probs)
            else:
                token = int(torch.argmax(logits))
            tokens.append(token)
            context.append(token)
        return Draft(tokens, torch.stack(rows) if rows else None)

    def observe(self, sequence: list[int], step: Step) -> None:
        pass  # the next propose crops the cache to the common prefix with the committed text
