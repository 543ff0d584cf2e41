"""Sampling as pure functions: penalties, temperature, top-k, top-p, min-p, and a seeded draw.

The order is Hugging Face's (and vLLM's before its V1 sampler, which applies min-p before top-k and top-p):
penalties -> temperature -> top-k -> top-p -> min-p -> draw.
Temperature 0 means argmax (after penalties). Randomness comes only from the `torch.Generator` passed in,
one per request, so the same seed gives the same tokens whatever else shares the batch (given the same logits:
fp32 models compute a row's logits alike alone or in a batch up to rounding; the int8 modes do not, see
`tinyllm.quantize`).

Shapes: B batch (rows), V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tinyllm.errors import TinyLLMError

MAX_TOP_LOGPROBS = 20  # OpenAI's bound on `top_logprobs`


class SamplingError(TinyLLMError):
    """A sampling parameter is out of range or inconsistent."""


MIN_TEMPERATURE = 1e-3  # below it a temperature counts as 0 (greedy): the same tokens, and no float32 overflow


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    The defaults suit a small model: a slightly cooled distribution (0.8) cut to the 50 likeliest tokens and
    the smallest set holding 95% of the mass keeps text coherent without the loops of greedy decoding.

    Attributes:
        temperature: divides the logits; 0 means greedy (argmax), and so does anything below `MIN_TEMPERATURE`
            (stored as 0). Range [0, 100].
        top_k: keep the k likeliest tokens; 0 turns it off.
        top_p: keep the smallest set of likeliest tokens whose probability reaches p; 1 turns it off. (0, 1].
        min_p: drop tokens less likely than min_p times the likeliest one; 0 turns it off. [0, 1].
        repetition_penalty: divides positive (multiplies negative) logits of every token already seen in the
            prompt or the output (CTRL / Hugging Face); 1 turns it off. (0, 10].
        presence_penalty: subtracted once from the logit of every token already in the output (OpenAI). [-2, 2].
        frequency_penalty: subtracted from a token's logit per time it appears in the output (OpenAI). [-2, 2].
        seed: seeds this request's generator; None draws a fresh seed.
        max_new_tokens: the most tokens to generate (>= 1).
        stop: strings that end generation; the text is cut before the first match.
        stop_token_ids: token ids that end generation (the id is kept in `token_ids`, not in the text).
        ignore_eos: keep going past the end-of-text token.
        logprobs: return the log-probability of each generated token.
        top_logprobs: with `logprobs`, also return this many likeliest alternatives per position. [0, 20].
    """

    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        # Accept lists (e.g. from JSON) but store tuples so the dataclass stays hashable and immutable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check(
            _is_real(self.temperature) and 0.0 <= self.temperature <= 100.0,
            "temperature",
            self.temperature,
            "0 (greedy) to 100",
        )
        if 0.0 < self.temperature < MIN_TEMPERATURE:  # dividing by it overflows float32 logits (NaN): greedy
            object.__setattr__(self, "temperature", 0.0)
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 (0 = off)")
        _check(_is_real(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", self.top_p, "in (0, 1] (1 = off)")
        _check(_is_real(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p", self.min_p, "in [0, 1] (0 = off)")
        _check(
            _is_real(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0,
            "repetition_penalty",
            self.repetition_penalty,
            "in (0, 10] (1 = off)",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_real(value) and -2.0 <= value <= 2.0, name, value, "in [-2, 2] (0 = off)")
        _check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63), "seed", self.seed, "in [0, 2**63)")
        _check(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, ">= 1")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "non-empty strings")
        _check(
            all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", self.stop_token_ids, "ids >= 0"
        )
        _check(
            _is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
            "top_logprobs",
            self.top_logprobs,
            f"an integer in [0, {MAX_TOP_LOGPROBS}]",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def replace(self, **changes: object) -> SamplingParams:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise SamplingError(f"{name} must be {expected}, got {value!r}")


# --- logits processors: each takes logits (..., V) and returns new logits ---------------------------------------------


def apply_penalties(
    logits: torch.Tensor,
    *,
    output_ids: Sequence[int],
    prompt_ids: Sequence[int] = (),
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
) -> torch.Tensor:
    """Penalize tokens already seen, for one row of logits (V,).

    The repetition penalty looks at the prompt and the output (as Hugging Face and vLLM do); the presence and
    frequency penalties look at the output only (as OpenAI defines them).
    """
    logits = logits.clone()
    if repetition_penalty != 1.0:
        seen = torch.tensor(list(prompt_ids) + list(output_ids), dtype=torch.long, device=logits.device).unique()
        if seen.numel():
            picked = logits[seen]
            logits[seen] = torch.where(picked > 0, picked / repetition_penalty, picked * repetition_penalty)
    if (presence_penalty != 0.0 or frequency_penalty != 0.0) and len(output_ids):
        ids = torch.tensor(list(output_ids), dtype=torch.long, device=logits.device)
        counts = torch.bincount(ids, minlength=logits.shape[-1])[: logits.shape[-1]].to(logits.dtype)  # (V,)
        logits -= frequency_penalty * counts + presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by the temperature (which must be > 0; temperature 0 is handled as argmax by `sample`).

    Below 1 the row's largest logit is subtracted first (the same softmax): the largest becomes 0 and the others
    tend to -inf as the temperature does, instead of overflowing to inf (whose softmax is NaN).
    """
    if temperature <= 0:
        raise SamplingError("temperature 0 means greedy: take the argmax instead of scaling")
    if temperature >= 1.0:
        return logits if temperature == 1.0 else logits / temperature
    return (logits - logits.amax(dim=-1, keepdim=True)) / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits of each row (..., V); the rest become -inf. k = 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    idx = logits.topk(k, dim=-1).indices
    return torch.full_like(logits, -math.inf).scatter(-1, idx, logits.gather(-1, idx))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of likeliest tokens whose probability reaches p (always >= 1)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly likelier tokens
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False  # the likeliest token is always kept, even when rounding says otherwise
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the likeliest token's probability."""
    if min_p <= 0.0:
        return logits
    # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p), with no softmax needed
    threshold = logits.max(dim=-1, keepdim=True).values + math.log(min_p)
    return logits.masked_fill(logits < threshold, -math.inf)


def _penalized(
    logits: torch.Tensor, params: SamplingParams, output_ids: Sequence[int], prompt_ids: Sequence[int]
) -> torch.Tensor:
    """The row in fp32 with the request's repetition / presence / frequency penalties applied."""
    logits = logits.float()
    if not params.has_penalties:
        return logits
    return apply_penalties(
        logits,
        output_ids=output_ids,
        prompt_ids=prompt_ids,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
    )


def process_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    *,
    output_ids: Sequence[int] = (),
    prompt_ids: Sequence[int] = (),
) -> torch.Tensor:
    """All processors for one row (V,) in order; the result's softmax is the distribution `sample` draws from.

    For greedy params only the penalties apply (the argmax of the result is the greedy token).
    """
    logits = _penalized(logits, params, output_ids, prompt_ids)
    if params.greedy:
        return logits
    logits = apply_temperature(logits, params.temperature)
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return min_p_filter(logits, params.min_p)


# --- drawing --------------------------------------------------------------------------------------------------------


def make_generator(seed: int | None, *, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one request: seeded when `seed` is given, else from a fresh OS-random seed."""
    if seed is None:
        seed = random.SystemRandom().randrange(2**63)
    return torch.Generator(device=device).manual_seed(seed)


def _sample_row(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    output_ids: Sequence[int],
    prompt_ids: Sequence[int],
) -> int:
    """One token id from one row (V,), equal in distribution to softmax(process_logits(...))."""
    logits = _penalized(logits, params, output_ids, prompt_ids)
    if params.greedy:
        return int(logits.argmax())
    logits = apply_temperature(logits, params.temperature)
    # Top-k first on the k candidates only: top-p and min-p then sort k values, not the whole vocabulary.
    index: torch.Tensor | None = None
    if 0 < params.top_k < logits.shape[-1]:
        logits, index = logits.topk(params.top_k)  # (k,), (k,)
    logits = min_p_filter(top_p_filter(logits, params.top_p), params.min_p)
    probs = logits.softmax(dim=-1)
    if not bool(torch.isfinite(probs).all()):  # a NaN or inf logit: the model's numbers broke, not the request's
        raise SamplingError("cannot sample: the model's logits hold NaN or inf")
    choice = int(torch.multinomial(probs, 1, generator=generator))
    return int(index[choice]) if index is not None else choice


def sample(
    logits: torch.Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    *,
    generators: Sequence[torch.Generator | None] | None = None,
    output_ids: Sequence[Sequence[int]] | None = None,
    prompt_ids: Sequence[Sequence[int]] | None = None,
    argmax: torch.Tensor | Sequence[int] | None = None,
    errors: dict[int, str] | None = None,
) -> list[int]:
    """Draw one token id per row of `logits` (B, V), each row with its own params and generator.

    Greedy rows without penalties share one batched argmax (or take `argmax` (B,), the rows' argmax when the
    caller has it already); other rows are drawn one by one. `output_ids` / `prompt_ids` give each row's history
    for the penalties. A row that cannot be drawn (its logits are not finite) raises SamplingError, or with
    `errors` is recorded there by row index (its token is a placeholder 0) while the other rows are drawn as
    they would have been.
    """
    if logits.dim() == 1:
        logits = logits.unsqueeze(0)
    B = logits.shape[0]
    row_params = [params] * B if isinstance(params, SamplingParams) else list(params)
    if len(row_params) != B:
        raise SamplingError(f"got {len(row_params)} SamplingParams for {B} rows of logits")
    gens = list(generators) if generators is not None else [None] * B
    outs = output_ids if output_ids is not None else [()] * B
    prompts = prompt_ids if prompt_ids is not None else [()] * B
    result = [0] * B
    plain_greedy = [i for i, p in enumerate(row_params) if p.greedy and not p.has_penalties]
    if plain_greedy:
        if argmax is None:
            tops = (logits if len(plain_greedy) == B else logits[plain_greedy]).argmax(dim=-1).tolist()
        else:
            every = argmax.view(-1).tolist() if isinstance(argmax, torch.Tensor) else list(argmax)
            tops = [every[i] for i in plain_greedy]
        for i, token in zip(plain_greedy, tops, strict=True):
            result[i] = token
    for i, p in enumerate(row_params):
        if not (p.greedy and not p.has_penalties):
            try:
                result[i] = _sample_row(logits[i], p, gens[i], outs[i], prompts[i])
            except SamplingError as exc:
                if errors is None:
                    raise
                errors[i] = str(exc)
    return result


def token_logprobs(
    logits: torch.Tensor, token_ids: Sequence[int], *, top_n: int = 0
) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per row of `logits` (B, V): the chosen token's log-probability and the `top_n` likeliest alternatives.

    Log-probabilities are those of the model's own distribution (before penalties, temperature and filters),
    as vLLM reports them by default.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    chosen = logp.gather(-1, torch.tensor(token_ids, device=logp.device).view(-1, 1)).view(-1).tolist()
    if top_n <= 0:
        return [(lp, []) for lp in chosen]
    values, indices = logp.topk(min(top_n, logp.shape[-1]), dim=-1)  # (B, top_n), at most the vocabulary
    tops = [list(zip(ix, vs, strict=True)) for ix, vs in zip(indices.tolist(), values.tolist(), strict=True)]
    return list(zip(chosen, tops, strict=True))
