"""The benchmark's compute floor, its pure part: which cells a decoded row
attends over, and how a turn's tokens add up to the floor."""

from __future__ import annotations

import pytest

from benchmarks import floor, workload


@pytest.mark.parametrize("cell, cells", [(0, 256), (254, 256), (255, 256), (256, 512),
                                         (511, 512), (512, 768)])
def test_a_row_attends_over_its_stream_s_cells_rounded_up_to_256(cell: int, cells: int) -> None:
    assert floor.attended(cell) == cells


def test_a_turn_s_rows_are_counted_by_the_cells_they_attend_over() -> None:
    turn = floor.Turn(start=470, new=[22, 23], first=493)
    rows = turn.rows()
    assert sum(rows.values()) == workload.MAX_TOKENS
    assert rows == {512: 512 - 493, 768: workload.MAX_TOKENS - (512 - 493)}


def test_the_floor_is_every_token_at_its_own_cost() -> None:
    sh = floor.Shape(shared=100, turns=[floor.Turn(start=100, new=[10, 20], first=130),
                                        floor.Turn(start=500, new=[5, 5], first=530)])
    costs = floor.Costs(shared=0.001, prompt=[0.002, 0.003], row={256: 0.004, 512: 0.005, 768: 0.006})
    n, m = 2, workload.MAX_TOKENS
    expected = (100 * 0.001 + 30 * 0.002 + n * m * 0.004
                + 10 * 0.003 + n * (m * 0.006))
    assert costs.floor(sh) == pytest.approx(expected)
    assert sh.distinct == 140
    assert costs.mean_row(sh) == pytest.approx((0.004 + 0.006) / 2)
