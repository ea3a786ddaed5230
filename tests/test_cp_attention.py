"""Every attention kind under context parallelism equals the one-process layer on the whole
sequence: cp 2, 3 and 4, float64, RoPE on, outputs and the gradients of the input and of every
parameter. The linear-time kinds run on slices that are uneven in chunks (T/K not a multiple of
attention.chunk_size: the chunking is an evaluation order, the state passing must not care);
GAU and DiagAttention on whole chunks / blocks, which the config requires of them."""

import pytest

from models.attention.state_passing import state_bytes

CASE = "cp_attention_cases:layer_matches_single_process"
# kind, layer index (transnormer: 0 = DiagAttention, 1 = NormAttention), T per cp rank, chunk size
KINDS = [("softmax", 0, 10, 4), ("linear", 0, 7, 4), ("performer", 0, 7, 3), ("gau", 0, 8, 4),
         ("transnormer", 1, 7, 4), ("transnormer", 0, 8, 4)]


@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("kind, layer_idx, per_rank, chunk", KINDS,
                         ids=[f"{k}-{'diag' if (k, i) == ('transnormer', 0) else 'layer'}" for k, i, _, _ in KINDS])
def test_layer_equals_one_process(pools, K, kind, layer_idx, per_rank, chunk):
    pools(4).run(CASE, kind=kind, K=K, T=K * per_rank, chunk_size=chunk, layer_idx=layer_idx)


@pytest.mark.parametrize("kind, layer_idx, formula", [
    ("linear", 0, lambda K: state_bytes(2, 2, 8, 8, normalize=True, cp_size=K, dtype_bytes=8)),
    ("transnormer", 1, lambda K: state_bytes(2, 2, 8, 8, normalize=False, cp_size=K, dtype_bytes=8)),
    # Performer: its 12 features' state and normaliser, and the no-gradient max exchange (B H values)
    ("performer", 0, lambda K: state_bytes(2, 2, 12, 8, normalize=True, cp_size=K, dtype_bytes=8)
     + (K - 1) * 2 * 2 * 8),
    ("gau", 0, lambda K: state_bytes(2, 1, 8, 32, normalize=False, cp_size=K, dtype_bytes=8)),  # s=8, e=2x16
    ("transnormer", 0, lambda K: 0),  # DiagAttention: blocks inside the slices, nothing travels
])
def test_state_passing_bytes_do_not_grow_with_the_sequence(pools, kind, layer_idx, formula):
    K = 4
    res = pools(4).run(CASE, kind=kind, K=K, T=K * 8, chunk_size=4, layer_idx=layer_idx, lengths=(K * 32,))
    for sent in res:
        # one communicator per length: the longer sequence sends exactly what the shorter one did
        assert sent[K * 8] == formula(K), (kind, sent, formula(K))
        assert sent[K * 32] == sent[K * 8], (kind, sent)


def test_performer_ranks_with_far_apart_key_maxima_stay_finite(pools):
    assert pools(4).run("cp_attention_cases:performer_far_apart_maxima")[:2] == [True, True]
