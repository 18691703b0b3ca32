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
