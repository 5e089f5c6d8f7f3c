from replknet_fn import build_replknet, replknet31_base
from replknet_fn.reparam import reparameterize
from replknet_fn.summary import summarize


def test_deploy_31b_has_the_papers_15_35g_macs_at_224():
    rows, total = summarize(reparameterize(replknet31_base()), 224)
    assert round(total["macs"] / 1e9, 2) == 15.35
    assert round(total["params"] / 1e6, 2) == 79.53
    assert [row["resolution"] for row in rows if row["part"].startswith("stage")] == [[56, 56], [28, 28], [14, 14],
                                                                                       [7, 7]]


def test_macs_of_a_tiny_net_by_hand():
    net = build_replknet([5], [1], [4], small_kernel=3, ffn_ratio=2, num_classes=2)
    rows, total = summarize(net, 16)
    by_part = {row["part"]: row["macs"] for row in rows}
    # stem at 8x8 then 4x4: 3x3 dense (4*3*9 @8x8), 3x3 dw (4*9 @8x8), 1x1 (16 @8x8), 3x3 dw s2 (36 @4x4)
    assert by_part["stem"] == 108 * 64 + 36 * 64 + 16 * 64 + 36 * 16
    # at 4x4: pw1 16, large 4*25, small 4*9, pw2 16, ffn 4*8 + 8*4
    assert by_part["stage1"] == (16 + 100 + 36 + 16 + 32 + 32) * 16
    assert by_part["head"] == 8
