"""
test_bench.py -- bench.py runs end to end (no timing is asserted anywhere).
"""
import bench


def test_bench_quick_runs(tmp_path):
    bench.RESULTS.clear()
    rows = bench.main(['--quick', '--out', str(tmp_path / 'b.jsonl')])
    names = {r['name'] for r in rows}
    assert {'sample_kv_cache', 'kv_cache_vs_recompute', 'cfg_one_batch_vs_two_forwards', 'reward_batched_vs_pil_loop',
            'grpo_step', 'grpo_step_rollout', 'grpo_overhead_beyond_rollout', 'compile_vs_eager'} <= names
    fractions = [r['value'] for r in rows if r['name'] in ('grpo_step_rollout', 'grpo_step_decode', 'grpo_step_reward',
                                                             'grpo_step_update')]
    assert 0.9 < sum(fractions) <= 1.0 + 1e-6  # the parts account for the step
    assert len(open(tmp_path / 'b.jsonl').readlines()) == len(rows)


def test_bench_loo_fid_section_runs_and_agrees_with_the_naive_way():
    bench.RESULTS.clear()
    row = next(r for r in bench.main(['--quick', '--only', 'loo_fid']) if r['name'] == 'loo_fid_step')
    assert row['max_abs_diff'] < 1e-9  # fid.loo_fid's rewards equal B + 1 distances computed from scratch


def test_step_paper_quick_rows_are_consistent(tmp_path):
    # the paper-step section at GPT-tiny shapes on the CPU: every figure finite and positive, the derived ones agree
    # with their parts, and the rollout's HBM floor equals the bytes counted from a real model and KV cache
    import math
    import torch
    from model import GPT, config_for
    bench.RESULTS.clear()
    argv = ['--quick', '--only', 'step_paper', '--out', str(tmp_path / 'p.jsonl')]
    rows = {r['name']: r for r in bench.main(argv)}
    for name in ('copy_bandwidth', 'step_paper_floor', 'step_paper_eager', 'step_paper_eager_rollout',
                 'step_paper_eager_update', 'step_paper_eager_peak', 'step_paper_rollout_vs_before',
                 'step_paper_logp_gap'):
        assert name in rows, name
    step, roll, upd = rows['step_paper_eager'], rows['step_paper_eager_rollout'], rows['step_paper_eager_update']
    floor = rows['step_paper_floor']
    for v in (step['value'], step['rollout'], step['decode'], step['update'], roll['value'], floor['floor_bytes'],
              upd['value'], rows['copy_bandwidth']['value'], rows['step_paper_eager_peak']['plan_GiB']):
        assert math.isfinite(v) and v > 0
    assert step['rollout'] + step['decode'] + step['update'] <= step['value'] * 1.001  # parts within the step
    B, N = 8, 16  # --quick: 8 images of 4x4 tokens
    assert math.isclose(roll['value'], B * N / roll['seconds'], rel_tol=1e-3)
    assert math.isclose(roll['fraction_of_floor'], roll['floor_s'] / roll['seconds'], rel_tol=1e-6)
    assert roll['floor_s'] == floor['floor_s']
    assert math.isclose(floor['floor_s'], floor['floor_bytes'] / (rows['copy_bandwidth']['value'] * 1e9), rel_tol=1e-3)
    assert math.isclose(upd['value'], upd['flops'] / upd['seconds'] / 1e12, rel_tol=1e-2)
    # the floor from a real model and cache: N forwards, each reading the non-embedding float32 weights and the
    # filled part (C + j positions) of the bf16 keys and values of every layer, both CFG halves
    m = GPT(config_for('GPT-tiny', 8, 2, vocab_size=64))
    weights = sum(p.numel() * p.element_size() for n, p in m.named_parameters() if 'embed' not in n)
    cache = m.to(torch.bfloat16).new_kv_cache(2 * B)
    C = m.config.cls_token_num
    kv = sum(t[:, :, :C + j].numel() * t.element_size() for j in range(N) for t in cache.k + cache.v)
    assert floor['floor_bytes'] == N * weights + kv
    gap = rows['step_paper_logp_gap']
    assert 0 < gap['value'] <= gap['max'] < 0.1  # bf16 sampler vs float32 policy: rounding, not another distribution
    assert rows['step_paper_rollout_vs_before']['same_tokens']  # on a CPU both run float32: the same tokens
