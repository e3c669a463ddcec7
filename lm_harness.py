"""Our models as an lm-evaluation-harness model: dense, pruned offline, or μ-MoE routed per request on its context.

lm-evaluation-harness (EleutherAI, `lm_eval` 0.4) turns every task into requests and asks a model three things:

    loglikelihood([(context, continuation)])  -> [(log p(continuation | context), is_greedy)]
    loglikelihood_rolling([text])             -> [log p(text)], scored in windows of max_length tokens
    generate_until([(context, gen_kwargs)])   -> [the greedy continuation, cut at the first stop string]

`HarnessLM` answers them for this project's models. Tokens and truncation follow lm-eval's own HFLM exactly: the
context keeps BOS as the checkpoint's tokenizer puts it, an empty context becomes the BOS (else EOS) token, a
request longer than max_length + 1 tokens loses its oldest context tokens, and the model reads
(context + continuation)[-(max_length + 1):][:-1]; the continuation is scored on the logits before each of its
tokens. Dense and offline-pruned models (prune first: pruners.prune_model) score requests in batches as HFLM does:
longest first, right-padded (causal attention needs no mask for that), one forward per distinct input; only the
positions that predict a continuation token go through the head (for a small model, the vocabulary's product
costs more than the blocks).

μ-MoE (rho < 1, or an N:M pattern) routes each request on its own tokens, and which tokens is `routing_scope`:

    "context"  (default) the router reads the context only, never the continuation it scores: the deployment
               reading of the paper (a prompt arrives, is routed, is answered). The context runs once, block by
               block, routed, filling the KV cache (mumoe.route_prompt); its last position predicts the
               continuation's first token, and the other tokens run through the cache with the experts the
               context chose, packed or masked (mumoe.decode_experts). Requests sharing a context (the choices
               of one question) share that one routing, and their continuations go through as one batch.
    "full"     the router reads context + continuation, as a perplexity window is routed on its own tokens: each
               request is one routed forward over its tokens (mumoe.mumoe_logits), at most max_length of them. It
               leaks the answer into the experts, so it measures how much the continuation helps its own routing.

"""

from collections import defaultdict

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

import decode_step
import distributed
from mumoe import DENSE, MuMoE, decode_experts, decode_path, generate, mumoe_logits, route_prompt

SCOPES = ("context", "full")
MAX_GEN_TOKS = 256  # HFLM's default number of new tokens for generate_until


class HarnessLM(TemplateLM):
    """An lm-eval model over one of our language models and its tokenizer.

    rho = 1 without nm: the model as it is (dense, or pruned beforehand). Otherwise μ-MoE at active ratio rho (or
    pruning N of every M weights, nm = (N, M)), with `routing` ("block" or "linear", see mumoe.routed_block) and
    `routing_scope` ("context" or "full", above). `batch_size`: requests per forward (dense), continuations per
    forward after one routed context (μ-MoE). `routed` counts the routed passes done: one per distinct context
    (scope "context"), one per distinct request (scope "full"). `decode` ("auto", "packed", "masked", see
    mumoe.decode_path): how the tokens after a routed context (continuations, generated text) use its experts;
    `decode_path` is the one that runs. `step` ("auto", "fused", "eager", see mumoe.generate): how generated text's
    decode steps run.
    """

    def __init__(self, model, tokenizer, batch_size: int = 16, moe: MuMoE = DENSE, routing_scope: str = "context",
                 max_length: int | None = None, decode: str = "auto", step: str = "auto"):
        super().__init__()
        if routing_scope not in SCOPES:
            raise ValueError(f"routing_scope must be one of {SCOPES}, got {routing_scope!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.moe, self.routing_scope = moe, routing_scope
        self.mumoe = not moe.dense
        self.max_length = max_length or model.config.max_position_embeddings
        self._device = next(model.parameters()).device
        self.decode, self.decode_path = decode, decode_path(decode, self._device, next(model.parameters()).dtype)
        self.step = step
        decode_step.chosen_step(step, model, "dense" if moe.dense else self.decode_path)  # fused where it cannot: now
        self.special_prefix = tokenizer.encode("")  # what the tokenizer puts before any text: [BOS] or nothing
        self.routed = 0

    # -------------------------------------------------------------------------
    # Data parallel, as lm-eval's evaluator drives it: under torchrun (distributed.py) each rank is given every
    # world_size-th document of each task, with all of its requests, and the per-document metrics are gathered on
    # rank 0, which alone computes the task's results; alone, each of these is lm-eval's no-op

    @property
    def rank(self) -> int:
        return distributed.rank()

    @property
    def world_size(self) -> int:
        return distributed.world_size()

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return distributed.all_gather(tensor)

    def gather_object(self, obj, dst: int = 0):
        if dst != 0:
            raise ValueError(f"objects are gathered on rank 0, not {dst}")
        return distributed.gather_objects(obj)

    def barrier(self) -> None:
        distributed.barrier()

    # -------------------------------------------------------------------------
    # Tokens, as HFLM makes them

    @property
    def eot_token_id(self) -> int:
        """The end of sequence (the first, where config.json lists several, as Llama 3's does)."""
        eos = self.model.config.eos_token_id
        return eos[0] if isinstance(eos, (list, tuple)) else eos

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context (and the first rolling window) is conditioned on: BOS, else EOS (HFLM's)."""
        return self.special_prefix[0] if self.special_prefix else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """BOS as the checkpoint's tokenizer puts it; without it if add_special_tokens is False, or (None) when the
        text starts with the BOS token itself, as HFLM does."""
        ids = self.tokenizer.encode(string)
        n = len(self.special_prefix)
        if n and (add_special_tokens is False or (add_special_tokens is None and ids[n:2 * n] == self.special_prefix)):
            ids = ids[n:]
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def window(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """(context, continuation) -> (the context the model reads, continuation): HFLM's left truncation, which keeps
        the last max_length + 1 tokens of context + continuation (the last one is predicted, never read)."""
        if not 1 <= len(continuation) <= self.max_length:
            raise ValueError(f"a continuation of {len(continuation)} tokens; at most max_length={self.max_length}")
        kept = (context + continuation)[-(self.max_length + 1):]
        return kept[: len(kept) - len(continuation)], continuation

    # -------------------------------------------------------------------------
    # Scoring

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """[(request key, context ids, continuation ids)] -> [(log-likelihood, is_greedy)], in request order."""
        windows = [self.window(context, continuation) for _, context, continuation in requests]
        if not self.mumoe:
            results = self.score_dense(windows, disable_tqdm)
        elif self.routing_scope == "context":
            results = self.score_routed_on_context(windows, disable_tqdm)
        else:
            results = self.score_routed_on_all(windows, disable_tqdm)
        for (key, _, _), result in zip(requests, results):
            if key is not None:  # rolling windows come without a key; their sums are cached per text
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    @torch.no_grad()
    def score_dense(self, windows, disable_tqdm=False) -> list[tuple[float, bool]]:
        """The model as it is: each distinct input (context + continuation[:-1]) once, longest first, in batches."""
        by_input = defaultdict(list)  # the tokens read -> the requests scored on their logits
        for i, (context, continuation) in enumerate(windows):
            by_input[tuple(context + continuation[:-1])].append(i)
        inputs = sorted(by_input, key=lambda ids: (-len(ids), ids))
        results = [None] * len(windows)
        for start in tqdm(range(0, len(inputs), self.batch_size), disable=disable_tqdm, desc="dense batches"):
            batch = inputs[start : start + self.batch_size]
            ids = torch.zeros(len(batch), len(batch[0]), dtype=torch.long)  # right-padded: pads follow every real token
            for row, tokens in enumerate(batch):
                ids[row, : len(tokens)] = torch.tensor(tokens)
            x = self.model.embed(ids.to(self.device))
            for block in self.model.blocks:
                x = block(x)  # (B, T, hidden)
            # A continuation of n tokens is predicted by the last n positions read: only those reach the head,
            # whose product with the vocabulary costs more than the blocks for a small model
            spans = [max(len(windows[i][1]) for i in by_input[tokens]) for tokens in batch]
            hidden = torch.cat([x[row, len(tokens) - n : len(tokens)]
                                for row, (tokens, n) in enumerate(zip(batch, spans))])  # (sum of spans, hidden)
            logprobs = F.log_softmax(self.model.head(hidden[None])[0].float(), dim=-1)
            for tokens, n, rows in zip(batch, spans, logprobs.split(spans)):
                for i in by_input[tokens]:
                    results[i] = score(rows[n - len(windows[i][1]):], windows[i][1])
        return results

    @torch.no_grad()
    def score_routed_on_context(self, windows, disable_tqdm=False) -> list[tuple[float, bool]]:
        """μ-MoE routed on each distinct context once; its continuations scored with the experts it chose."""
        by_context = defaultdict(list)
        for i, (context, _) in enumerate(windows):
            by_context[tuple(context)].append(i)
        results = [None] * len(windows)
        for context, group in tqdm(by_context.items(), disable=disable_tqdm, desc="μ-MoE contexts"):
            longest = max(len(windows[i][1]) for i in group)
            cache = self.model.new_cache(len(context) + longest - 1)  # the last continuation token is never read
            x, chosen = route_prompt(self.model, torch.tensor([context], device=self.device), cache, self.moe,
                                     self.decode_path)  # packed as routed where the decode is packed
            self.routed += 1
            first = F.log_softmax(self.model.head(x[:, -1:]).float(), dim=-1)[0]  # (1, vocab): the first token's
            longer = [i for i in group if len(windows[i][1]) > 1]
            experts = decode_experts(chosen, self.decode_path) if longer else None  # one set for every continuation
            del chosen
            for i in group:
                if len(windows[i][1]) == 1:
                    results[i] = score(first, windows[i][1])
            for start in range(0, len(longer), self.batch_size):
                batch = longer[start : start + self.batch_size]
                read = [windows[i][1][:-1] for i in batch]  # the continuation tokens after the first are read too
                ids = torch.zeros(len(batch), max(map(len, read)), dtype=torch.long)
                for row, tokens in enumerate(read):
                    ids[row, : len(tokens)] = torch.tensor(tokens)
                logits = self.model(ids.to(self.device), experts, repeat_cache(self.model, cache, len(batch)))
                logprobs = F.log_softmax(logits.float(), dim=-1)  # (B, T, vocab)
                for row, i in enumerate(batch):
                    rest = logprobs[row, : len(read[row])]
                    results[i] = score(torch.cat([first, rest]), windows[i][1])
        return results

    @torch.no_grad()
    def score_routed_on_all(self, windows, disable_tqdm=False) -> list[tuple[float, bool]]:
        """μ-MoE routed on context + continuation, one routed forward per distinct request. A window of
        max_length + 1 tokens has no position for all of them: its oldest context token gives way, or, where the
        context is a single token (a rolling window's), the continuation's last token (which is then not routed on,
        only predicted)."""
        by_tokens = defaultdict(list)  # the tokens read and routed on -> (request, its context's length there)
        for i, (context, continuation) in enumerate(windows):
            if len(context) + len(continuation) <= self.max_length:
                tokens, n_context = context + continuation, len(context)
            elif len(context) > 1:  # the oldest context token gives way
                tokens, n_context = context[1:] + continuation, len(context) - 1
            else:  # a rolling window's one-token context: the continuation's last token is not read
                tokens, n_context = context + continuation[:-1], 1
            by_tokens[tuple(tokens)].append((i, n_context))
        results = [None] * len(windows)
        for tokens, group in tqdm(by_tokens.items(), disable=disable_tqdm, desc="μ-MoE requests"):
            ids = torch.tensor([tokens], device=self.device)
            logits = mumoe_logits(self.model, ids, self.moe)
            self.routed += 1
            logprobs = F.log_softmax(logits[0].float(), dim=-1)  # (T, vocab)
            for i, n_context in group:
                n = len(windows[i][1])  # predicted by the positions from the context's last one on
                results[i] = score(logprobs[n_context - 1 : n_context - 1 + n], windows[i][1])
        return results

    # -------------------------------------------------------------------------
    # Rolling log-likelihood and generation

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) of each whole text, in lm-eval's disjoint windows of max_length tokens (HFLM's). μ-MoE routes
        each window as the scope says. lm-eval gives a full window a context of one token (BOS, or the token
        before the window), so for perplexity tasks the context scope routes on one token: use scope "full",
        which routes each window on its own tokens, as eval_ppl.py's perplexity does."""
        windows, owners = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[n] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, one request at a time through the KV cache (μ-MoE: routed on the context), ended
        at EOS, at `max_gen_toks` or at the first of the `until` strings, which is cut off, as HFLM does."""
        outputs = []
        for req in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = kwargs.pop("max_gen_toks", MAX_GEN_TOKS)
            if kwargs.get("do_sample") and kwargs.get("temperature", 1.0) > 0:
                raise ValueError(f"only greedy decoding is implemented, got {gen_kwargs}")
            ids = self.tok_encode(context, left_truncate_len=self.max_length - max_new)

            def reached_stop(new: list[int]) -> bool:
                return any(stop in self.tokenizer.decode(new) for stop in until)

            new = generate(self.model, ids, max_new, self.moe, eos_id=self.model.config.eos_token_id,
                           stop=reached_stop if until else None, decode=self.decode, step=self.step)
            text = self.tokenizer.decode(new)
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return outputs


def score(logprobs: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
    """(sum of log p of the continuation's tokens, whether each is the argmax) from the log-probabilities
    (n, vocab) of the n positions that predict them."""
    target = torch.tensor(continuation, device=logprobs.device)
    logprob = logprobs.gather(1, target[:, None]).sum().item()
    return logprob, bool((logprobs.argmax(dim=-1) == target).all())


def repeat_cache(model, cache, batch: int):
    """A copy of a one-sequence KV cache for `batch` sequences that continue it, each with room for the same count."""
    wide = model.new_cache(cache[0].k.shape[2], batch)
    for one, many in zip(cache, wide):
        n = one.length
        many.k[:, :, :n], many.v[:, :, :n] = one.k[:, :, :n], one.v[:, :, :n]
        many.length = n
    return wide
