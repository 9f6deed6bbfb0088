"""moonforge's model class for lm-evaluation-harness, registered as ``moonforge``.

It scores requests with moonforge's own ``Transformer`` and tokenizer, so a training checkpoint is evaluated
directly, without an export to Hugging Face format:

    loglikelihood          batched by length (longest first), one forward per shared context, fp32 log-softmax,
                           context truncated on the left to the model's max length
    loglikelihood_rolling  lm-eval's rolling windows, scored through the same batched path
    generate_until         greedy decoding with stop strings: one forward over the batch's left-padded
                           prompts fills a KV cache, then one token per unfinished row per step

Under torchrun (WORLD_SIZE > 1) each rank holds a full copy and scores its share of the requests; lm-eval
splits and gathers them. ``device_map="auto"`` instead spreads one copy layer by layer over all visible GPUs.
From Python, importing this module registers the name for lm-eval:
``lm_eval.simple_evaluate(model="moonforge", model_args="pretrained=DIR,batch_size=16", tasks=[...])``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from moonforge.model import KVCache, Transformer, left_padded
from moonforge.utils import parse_dtype

logger = logging.getLogger(__name__)

Request = tuple[tuple[str, str] | None, list[int], list[int]]


@register_model("moonforge")
class MoonforgeLM(TemplateLM):
    """lm-eval model backed by a moonforge ``Transformer`` and moonforge tokenizer.

    Args:
        pretrained: a loaded ``Transformer``, or a directory (Hugging Face export or moonforge checkpoint).
        tokenizer: a moonforge tokenizer or its directory; default: the ``pretrained`` directory.
        batch_size: sequences per forward pass.
        max_length: longest input in tokens; default: the config's ``max_position_embeddings``.
        max_gen_toks: default generation limit when a task sets none.
        dtype: weights' dtype when loading ("auto": bf16 on GPU, fp32 on CPU).
        device: where to load (default: this rank's GPU, else CPU).
        device_map: "auto" to spread layers over all visible GPUs, or a comma-separated device list.
        add_bos_token: prepend the tokenizer's BOS to every input (Moonlight's tokenizer adds none).
        kv_cache: generate with a KV cache (default); false recomputes every sequence for each new token (the
            same tokens, much slower: kept as the reference the cache is tested and timed against).
    """

    def __init__(self, pretrained: str | Path | Transformer, tokenizer=None, batch_size: int | str = 16,
                 max_length: int | str | None = None, max_gen_toks: int | str = 256, dtype: str = "auto",
                 device: str | None = None, device_map: str | list | None = None,
                 add_bos_token: bool | str = False, kv_cache: bool | str = True):
        super().__init__()
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size 'auto' is not supported by the moonforge model; give a number")
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self._rank, self._world_size = _init_distributed()
        if device_map and self._world_size > 1:
            raise ValueError("device_map spreads one model copy over the GPUs of one process; under torchrun "
                             "each rank holds a full copy instead, so use one or the other")
        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        placement = None
        if device_map:
            from moonforge.eval.placement import visible_devices

            placement = visible_devices() if device_map == "auto" else _device_list(device_map)
        if dtype == "auto":
            on_gpu = any(torch.device(d).type == "cuda" for d in (placement or [device]))
            dtype = "bf16" if on_gpu else "fp32"

        if isinstance(pretrained, Transformer):
            self.model = pretrained
            self.path = None
        else:
            from moonforge.loading import load_model

            self.path = Path(pretrained)
            self.model = load_model(self.path, dtype=parse_dtype(dtype), device="cpu" if placement else device)
        self.model.eval()
        if placement:
            from moonforge.eval.placement import place_layers

            place_layers(self.model, placement)
        self._device = self.model.model.embed_tokens.weight.device

        if tokenizer is None:
            if self.path is None:
                raise ValueError("pass tokenizer= with a loaded model")
            tokenizer = self.path
        if isinstance(tokenizer, (str, Path)):
            from moonforge.loading import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        if tokenizer.eos_id is None:
            raise ValueError("the tokenizer defines no eos_token; lm-eval needs it as end-of-text")
        self._special_ids = set(tokenizer.special_tokens.values())
        self._stop_ids = _stop_token_ids(tokenizer, self.model.config, self.path)
        self.add_bos_token = _as_bool(add_bos_token)
        self.kv_cache = _as_bool(kv_cache)
        self._max_length = int(max_length) if max_length else self.model.config.max_position_embeddings
        self.max_gen_toks = int(max_gen_toks)
        self._warned_sampling = False

    # ------------------------------------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """Conditioning token for an empty context: BOS when the tokenizer has one (as lm-eval's ``hf``)."""
        bos = self.tokenizer.bos_id
        return bos if bos is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "path", "moonforge")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        ids = self.tokenizer.encode(string)
        add_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        bos = self.tokenizer.bos_id
        if add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped by default, as lm-eval's ``hf`` backend does."""
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self.tokenizer.decode(ids)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.render_chat(chat_history, add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------------------------------------------ forward
    @torch.inference_mode()
    def _logits(self, rows: list[list[int]], ends: list[int], width: int) -> torch.Tensor:
        """Logits [B, width, V] at the last ``width`` positions before ``ends[i]`` of each right-padded row.

        Padding sits after every real token, so causality hides it. Only the selected positions go through
        ``lm_head``: with a 160k vocabulary the full [B, S, V] logits would dwarf the activations. Where a row
        has fewer than ``width`` positions, the first entries repeat position 0 and are to be ignored.
        """
        length = max(len(r) for r in rows)
        tokens = torch.full((len(rows), length), self.eot_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        positions = (torch.tensor(ends)[:, None] - width + torch.arange(width)[None]).clamp(min=0)

        def select_positions(module, args):
            hidden = args[0]
            index = positions.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[-1])
            return (hidden.gather(1, index),)

        handle = self.model.lm_head.register_forward_pre_hook(select_positions)
        try:
            return self.model(tokens.to(self._device))
        finally:
            handle.remove()

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum of log p(continuation), whether greedy decoding yields it) per request.

        Requests that differ only in their last continuation token (multiple choice with one-token answers)
        share one forward pass.
        """
        def sort_key(req: Request):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        reorder = Collator(requests, sort_fn=sort_key, group_by="contexts", group_fn=lambda r: r[1] + r[2][:-1])
        results = []
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="loglikelihood",
                    unit="req")
        for chunk in reorder.get_batched(n=self.batch_size):
            rows, spans = [], []
            for _, context, continuation in chunk:
                if not continuation:
                    raise ValueError("empty continuation: nothing to score")
                if len(continuation) > self.max_length:
                    raise ValueError(f"a continuation of {len(continuation)} tokens exceeds max_length "
                                     f"{self.max_length}")
                # Predicting token t needs tokens < t: the input drops the last token; the context is cut on the left.
                row = (context + continuation)[-(self.max_length + 1):][:-1]
                rows.append(row)
                spans.append((len(row) - len(continuation), len(row)))
            width = max(end - start for start, end in spans)
            logits = self._logits(rows, [end for _, end in spans], width)
            for (strings, context, continuation), row_logits, (start, end) in zip(chunk, logits, spans):
                logprobs = F.log_softmax(row_logits[width - (end - start):].float(), dim=-1)[None]  # [1, cont, V]
                greedy = logprobs.argmax(dim=-1)
                # Requests sharing this forward pass: the same tokens up to their last continuation token.
                for shared_strings, shared_cont, shared_logprobs in reorder.get_cache(
                        req_str=strings, cxt_toks=context, cont_toks=continuation, logits=logprobs):
                    cont = torch.tensor(shared_cont, dtype=torch.long, device=logprobs.device)[None]
                    n = cont.shape[1]
                    is_greedy = bool((greedy[:, -n:] == cont).all())
                    answer = (float(shared_logprobs[:, -n:].gather(2, cont[..., None]).sum()), is_greedy)
                    results.append(answer)
                    if shared_strings is not None:
                        self.cache_hook.add_partial("loglikelihood", shared_strings, answer)
                    pbar.update(1)
        pbar.close()
        return reorder.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in disjoint windows of at most max_length tokens (lm-eval's rule)."""
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first stop string (the EOS text is always one)."""
        reorder = Collator([req.args for req in requests], sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
                           group_by="gen_kwargs", group_fn=lambda a: a[1])
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        results = []
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="generate_until",
                    unit="req")
        for chunk in reorder.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            if kwargs.get("do_sample") and not self._warned_sampling:
                logger.warning("a task asks for sampling (%s); the moonforge model decodes greedily", all_kwargs[0])
                self._warned_sampling = True
            until = handle_stop_sequences(kwargs["until"], eos=eos_text)
            max_new = kwargs["max_gen_toks"]
            max_context = self.max_length - max_new
            if max_context <= 0:
                raise ValueError(f"max_gen_toks {max_new} leaves no room for context in max_length "
                                 f"{self.max_length}")
            prompts = [self.tok_encode(c, left_truncate_len=max_context) for c in contexts]
            for context, generated in zip(contexts, self._greedy(prompts, until, max_new)):
                text = postprocess_generated_text(self.tok_decode(generated), stop=until, think_end_token=None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
                pbar.update(1)
        pbar.close()
        return reorder.get_original(results)

    @torch.inference_mode()
    def _greedy(self, prompts: list[list[int]], until: list[str], max_new: int) -> list[list[int]]:
        """Greedy tokens per prompt, stopping at an end token (not included), a stop string, or ``max_new``
        tokens. End tokens: the tokenizer's EOS and the model's ``eos_token_id`` (Moonlight's is
        ``<|im_end|>``), plus those of generation_config.json, as transformers' ``generate`` uses them.

        One forward over the left-padded prompts fills a KV cache; then each step feeds one token per unfinished
        row, and finished rows leave the cache."""
        if max_new < 1:
            return [[] for _ in prompts]
        prompts = [p or [self.prefix_token_id] for p in prompts]  # an empty context conditions on BOS (or EOS)
        if not self.kv_cache:
            return self._greedy_recomputed(prompts, until, max_new)
        generated: list[list[int]] = [[] for _ in prompts]
        cache = KVCache(capacity=max(len(p) for p in prompts) + max_new)
        logits = self._last_logits(*left_padded(prompts, self.eot_token_id), None, cache)
        active = list(range(len(prompts)))
        while True:
            kept = self._advance(active, logits.argmax(dim=-1).tolist(), generated, until, max_new)
            if not kept:
                return generated
            if len(kept) < len(active):
                cache.keep(kept)
            active = [active[row] for row in kept]
            new = torch.tensor([[generated[i][-1]] for i in active], dtype=torch.long)
            positions = torch.tensor([[len(prompts[i]) + len(generated[i]) - 1] for i in active])
            logits = self._last_logits(new, torch.ones_like(new), positions, cache)

    def _greedy_recomputed(self, prompts: list[list[int]], until: list[str], max_new: int) -> list[list[int]]:
        """``_greedy`` without a cache: every step runs the whole of each unfinished sequence again."""
        generated: list[list[int]] = [[] for _ in prompts]
        active = list(range(len(prompts)))
        while active:
            rows = [prompts[i] + generated[i] for i in active]
            logits = self._logits(rows, [len(r) for r in rows], width=1)[:, -1]
            active = [active[row] for row in self._advance(active, logits.argmax(dim=-1).tolist(), generated,
                                                           until, max_new)]
        return generated

    def _advance(self, active: list[int], next_tokens: list[int], generated: list[list[int]], until: list[str],
                 max_new: int) -> list[int]:
        """Append each active row's next token (unless it is an end token); the rows (positions in ``active``)
        that go on: no end token, no stop string in their text, fewer than ``max_new`` tokens."""
        kept = []
        for row, (i, token) in enumerate(zip(active, next_tokens)):
            if token in self._stop_ids:
                continue
            generated[i].append(token)
            if len(generated[i]) < max_new and not any(stop in self.tok_decode(generated[i]) for stop in until if stop):
                kept.append(row)
        return kept

    def _last_logits(self, tokens: torch.Tensor, documents: torch.Tensor, positions: torch.Tensor | None,
                     cache: KVCache) -> torch.Tensor:
        """Logits [B, V] at each row's last position; only that position goes through ``lm_head``."""
        handle = self.model.lm_head.register_forward_pre_hook(lambda module, args: (args[0][:, -1:],))
        try:
            out = self.model(tokens.to(self._device), position_ids=None if positions is None else
                             positions.to(self._device), document_ids=documents.to(self._device), cache=cache)
        finally:
            handle.remove()
        return out[:, -1].float()

    # ------------------------------------------------------------------------------------------------ ranks
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, gathered, dst=dst)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def get_model_info(self) -> dict:
        params = sum(p.numel() for p in self.model.parameters())
        return {"model_path": str(self.path) if self.path else None, "model_num_parameters": params,
                "model_dtype": str(self.model.model.embed_tokens.weight.dtype)}


def _init_distributed() -> tuple[int, int]:
    """(rank, world size), joining torchrun's process group when launched by it."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _stop_token_ids(tokenizer, config, path: Path | None) -> set[int]:
    ids = {tokenizer.eos_id}
    candidates = [config.eos_token_id]
    generation_config = path / "generation_config.json" if path is not None else None
    if generation_config is not None and generation_config.is_file():
        candidates.append(json.loads(generation_config.read_text(encoding="utf-8")).get("eos_token_id"))
    for value in candidates:
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    return ids


def _device_list(device_map: str | list) -> list[str]:
    devices = device_map.split(",") if isinstance(device_map, str) else list(device_map)
    if not devices:
        raise ValueError("device_map: give 'auto' or a comma-separated list of devices")
    return [d.strip() for d in devices]


def _as_bool(value: bool | str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")
