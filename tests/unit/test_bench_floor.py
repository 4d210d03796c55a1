"""The benchmark's compute floor, its pure part: which cells a decoded row
attends over, and how a turn's tokens add up to the floor."""

from __future__ import annotations

import pytest

from benchmarks import floor, workload


@pytest.mark.parametrize("cell, cells", [(0, 256), (254, 256), (255, 256), (256, 512),
                                         (511, 512), (512, 768)])
def test_a_row_attends_over_its_stream_s_cells_rounded_up_to_256(cell: int, cells: int) -> None:
    assert floor.attended(cell) == cells


def test_a_turn_s_rows_are_counted_agent_by_agent_by_the_cells_they_attend_over() -> None:
    # an answer's last token is not decoded as a row: the next prompt begins with it
    decoded = workload.MAX_TOKENS - 1
    turn = floor.Turn(start=470, new=[22, 23], firsts=[493, 500])
    assert turn.rows() == {512: (512 - 493) + (512 - 500),
                           768: (decoded - (512 - 493)) + (decoded - (512 - 500))}


def test_the_floor_is_every_token_at_its_own_cost() -> None:
    sh = floor.Shape(shared=100, turns=[floor.Turn(start=100, new=[10, 20], firsts=[130, 131]),
                                        floor.Turn(start=470, new=[5, 5], firsts=[500, 500])])
    costs = floor.Costs(shared=0.001, prompt=[0.002, 0.003], row={256: 0.004, 512: 0.005, 768: 0.006})
    m = workload.MAX_TOKENS - 1
    below = 512 - 500   # rows of the second turn that attend over 512 cells
    expected = (100 * 0.001 + 30 * 0.002 + 2 * m * 0.004
                + 10 * 0.003 + 2 * (below * 0.005 + (m - below) * 0.006))
    assert costs.floor(sh) == pytest.approx(expected)
    assert sh.distinct == 140
    rows = 4 * m
    assert costs.mean_row(sh) == pytest.approx(
        (2 * m * 0.004 + 2 * below * 0.005 + 2 * (m - below) * 0.006) / rows)
