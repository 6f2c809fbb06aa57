"""Scheduler and block pool on the host: budgets, chunking, preemption, FCFS, abort, shared prompt pages."""

import pytest

from jaxllm import SamplingParams
from jaxllm.block_pool import BlockPool, OutOfPagesError
from jaxllm.request import Request, Status
from jaxllm.scheduler import Scheduler


def make(rid, prompt_len, leader=None, index=0, max_tokens=100):
    return Request(rid, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens), max_tokens=max_tokens,
                   seed=0, index=index, leader=leader)


def run_step(scheduler):
    """Schedule once and pretend the model ran: computed counts advance, completed chunks get a token per
    step."""
    out = scheduler.schedule()
    for chunk in out.chunks:
        chunk.request.num_computed_tokens += chunk.num_tokens + chunk.num_steps - 1
        if chunk.completes:
            chunk.request.token_ids += [7] * chunk.num_steps
    return out


def test_pool_refcounts_and_double_free():
    pool = BlockPool(4, 16)
    pages = pool.allocate(3)
    pool.share(pages[:2])
    pool.free(pages)
    assert pool.num_free == 2  # the unshared page is back; the shared two still have a holder
    pool.free(pages[:2])
    assert pool.num_free == 4
    with pytest.raises(ValueError, match="freed twice"):
        pool.free(pages[:1])
    with pytest.raises(OutOfPagesError):
        pool.allocate(5)


def test_chunked_prefill_under_token_budget_and_running_first():
    s = Scheduler(BlockPool(64, 4), max_num_seqs=4, max_num_batched_tokens=10)
    a, b = make("a", 23), make("b", 5)
    s.add(a)
    s.add(b)
    out = run_step(s)
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [("a", 0, 10)]
    out = run_step(s)
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [("a", 10, 10)]
    out = run_step(s)  # a finishes its prompt (3), b is admitted with the rest of the budget
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("a", 3), ("b", 5)]
    out = run_step(s)  # both decode
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 1)]
    assert len(a.pages) == 6 and len(b.pages) == 2


def test_sequence_cap():
    s = Scheduler(BlockPool(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        s.add(make(str(i), 3))
    out = run_step(s)
    assert [c.request.request_id for c in out.chunks] == ["0", "1"]
    assert [r.request_id for r in s.waiting] == ["2"]


def test_preempts_newest_when_pages_run_out_and_recomputes_it():
    s = Scheduler(BlockPool(4, 4), max_num_seqs=4, max_num_batched_tokens=100)
    old, new = make("old", 8), make("new", 7)
    s.add(old)
    s.add(new)
    run_step(s)  # old: 8 prompt tokens -> 2 pages; new: 7 -> 2 pages; the pool is full
    assert s.pool.num_free == 0
    out = run_step(s)  # old needs a third page for its 9th token: new is preempted
    assert out.preempted == [new]
    assert new.status is Status.WAITING and new.pages == [] and new.num_computed_tokens == 0
    assert [c.request for c in out.chunks] == [old]
    assert s.waiting[0] is new and s.num_preemptions == 1
    s.finish(old, "stop")
    out = run_step(s)
    assert out.chunks[0].request is new and out.chunks[0].num_tokens == 8  # prompt + its sampled token
    s.finish(new, "abort")
    assert s.pool.num_free == 4


def test_fcfs_head_of_line_waits_for_pages():
    s = Scheduler(BlockPool(4, 4), max_num_seqs=4, max_num_batched_tokens=100)
    first, big, small = make("first", 8), make("big", 12), make("small", 2)
    for r in (first, big, small):
        s.add(r)
    out = run_step(s)
    assert [c.request for c in out.chunks] == [first]  # big does not fit; small may not overtake it
    assert list(s.waiting) == [big, small]


def test_abort_waiting_and_running_frees_pages():
    s = Scheduler(BlockPool(8, 4), max_num_seqs=4, max_num_batched_tokens=100)
    a, b = make("a", 9), make("b", 3)
    s.add(a)
    run_step(s)
    s.add(b)
    s.finish(a, "abort")
    s.finish(b, "abort")
    assert s.pool.num_free == 8 and not s.running and not s.waiting
    assert a.finish_reason == "abort" and b.finished


def test_parallel_samples_share_full_prompt_pages():
    s = Scheduler(BlockPool(16, 4), max_num_seqs=4, max_num_batched_tokens=100)
    leader = make("0_x", 10)
    sibling = make("1_x", 10, leader=leader, index=1)
    s.add(leader)
    s.add(sibling)
    out = run_step(s)
    assert [c.request for c in out.chunks] == [leader]  # the sibling waits for the prompt
    out = run_step(s)
    chunk = [c for c in out.chunks if c.request is sibling][0]
    assert sibling.pages[:2] == leader.pages[:2]  # two full pages shared, the partial third recomputed
    assert (chunk.start, chunk.num_tokens) == (8, 2)
    assert s.pool.num_free == 16 - 3 - 1
    s.finish(leader, "stop")
    assert s.pool.num_free == 16 - 3  # shared pages stay with the sibling
    s.finish(sibling, "stop")
    assert s.pool.num_free == 16


def test_multistep_decode_reserves_pages_for_its_steps_within_max_tokens():
    s = Scheduler(BlockPool(64, 4), max_num_seqs=4, max_num_batched_tokens=100, num_scheduler_steps=8,
                  max_model_len=64)
    a, b = make("a", 6), make("b", 3, max_tokens=5)
    s.add(a)
    s.add(b)
    out = run_step(s)  # prefills run one step
    assert [c.num_steps for c in out.chunks] == [1, 1]
    out = run_step(s)  # decodes only: a takes 8 steps, b the 4 tokens it may still sample
    assert [c.num_steps for c in out.chunks] == [8, 4]
    assert len(a.pages) == s.pool.pages_for(6 + 8) and len(b.pages) == s.pool.pages_for(3 + 4)
    c = make("c", 5)
    s.add(c)
    out = run_step(s)  # a prefill in the batch: one step for everyone
    assert [ch.num_steps for ch in out.chunks] == [1, 1, 1]


def test_multistep_stops_at_max_model_len_and_falls_back_to_one_step_without_pages():
    s = Scheduler(BlockPool(5, 4), max_num_seqs=2, max_num_batched_tokens=100, num_scheduler_steps=8,
                  max_model_len=12)
    a, b = make("a", 8), make("b", 1)
    s.add(a)
    s.add(b)
    run_step(s)  # a: 2 pages, b: 1 page
    out = run_step(s)  # a may sample up to token 12: 3 steps; b's 8 steps need 2 more pages, 1 is free
    assert [c.num_steps for c in out.chunks] == [3, 1]
    s.finish(a, "length")
    out = run_step(s)
    assert [c.num_steps for c in out.chunks] == [8] and len(b.pages) == 3


def test_running_requests_hold_distinct_slots_until_released():
    s = Scheduler(BlockPool(64, 4), max_num_seqs=3, max_num_batched_tokens=100)
    requests = [make(str(i), 3) for i in range(4)]
    for r in requests:
        s.add(r)
    out = run_step(s)
    assert all(c.new for c in out.chunks) and sorted(r.slot for r in requests[:3]) == [0, 1, 2]
    assert requests[3].slot is None
    freed = requests[1].slot
    s.finish(requests[1], "stop")
    out = run_step(s)
    assert requests[1].slot is None and requests[3].slot == freed
    assert [c.new for c in out.chunks] == [False, False, True]
