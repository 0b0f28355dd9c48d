"""Batched token sampling, implemented in Rust (crates/sampler).

Each row of logits is filtered in the order temperature, top-k, top-p, min-p, and one token
is drawn from what is left:

1. Temperature: weights are exp((x - max(x)) / temperature). Subtracting the maximum keeps
   every weight in [0, 1] with the best token at 1, so no temperature, however small, gives
   NaN. Weights below about 1e-38 are flushed to 0. Temperature 0 is greedy: the token with
   the largest logit (ties to the lowest id), whatever the other parameters are.
2. Top-k keeps the top_k tokens with the largest logits (ties to the lowest id). 0 disables
   it; values above V act as V.
3. Top-p ranks the tokens left by probability (ties to the lowest id) and keeps the shortest
   prefix whose probability reaches top_p, and at least one token: 1 disables it, 0 keeps
   only the most likely token.
4. Min-p drops the tokens whose probability is below min_p times the most likely one's.
   0 disables it.
5. The draw uses a Philox4x32-10 counter-based generator keyed by (seed, step): the same row
   with the same parameters gives the same token at any position of any batch. Tokens may
   differ between machines with different instruction sets (AVX-512, AVX2, neither), whose
   weights differ in the last bits.

The GIL is released while sampling. When the batch has more than one row, the calling thread
and RAYON_NUM_THREADS - 1 threads of rayon's pool (all cores by default) share the rows.
"""

import numpy as np
import numpy.typing as npt

class SampleResult:
    """Tokens sampled for a batch of B rows."""

    @property
    def tokens(self) -> npt.NDArray[np.int64]:
        """[B] sampled token ids; -1 for a row in error."""
    @property
    def logprobs(self) -> npt.NDArray[np.float32]:
        """[B] log_softmax(logits) at the sampled token: the model's own distribution,
        before temperature and filters (as vLLM reports it). NaN for a row in error."""
    @property
    def top_ids(self) -> npt.NDArray[np.int64] | None:
        """[B, num_logprobs] most likely token ids, most likely first (ties to the lowest
        id); -1 for a row in error. None when num_logprobs is 0."""
    @property
    def top_logprobs(self) -> npt.NDArray[np.float32] | None:
        """[B, num_logprobs] their logprobs under log_softmax(logits); NaN for a row in
        error. None when num_logprobs is 0."""
    @property
    def errors(self) -> list[str | None]:
        """Per row: None, or why the row could not be sampled, such as
        "row 3: logits contain NaN"."""
    def __len__(self) -> int: ...

def sample(
    logits: npt.NDArray[np.float32],
    temperature: npt.NDArray[np.float32],
    top_k: npt.NDArray[np.int64],
    top_p: npt.NDArray[np.float32],
    min_p: npt.NDArray[np.float32],
    seed: npt.NDArray[np.uint64],
    step: npt.NDArray[np.uint64],
    num_logprobs: int = 0,
) -> SampleResult:
    """Sample one token per row of `logits`.

    Args:
        logits: float32 [B, V]. Read in place when C-contiguous (a CPU torch tensor's
            `.numpy()`), copied once otherwise.
        temperature: float32 [B], finite and >= 0; 0 is greedy.
        top_k: int64 [B], >= 0; 0 disables it, values above V act as V.
        top_p: float32 [B] in [0, 1]; 1 disables it, 0 keeps only the most likely token.
        min_p: float32 [B] in [0, 1]; 0 disables it.
        seed: uint64 [B], the key of each row's random generator.
        step: uint64 [B], the index of the token being generated within its request.
        num_logprobs: how many of the most likely tokens to return per row, in [0, V].

    A row containing NaN, or whose logits are all -inf, does not fail the call. Its token
    is -1, its entry in `errors` gives the reason, and the other rows are unaffected. A row whose maximum is
    +inf is sampled as if its +inf tokens had logit 0 and every other token -inf.

    Raises:
        TypeError: an argument is not a numpy array of the dtype above.
        ValueError: a shape does not match (the message gives both shapes), or a parameter
            is outside its range, NaN included (the message names the parameter, the row
            and the value, e.g. "top_p[2] = 1.5 is outside [0, 1]").
    """
