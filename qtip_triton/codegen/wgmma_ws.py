"""The warp-specialized form of the wgmma kernel (config ``WS = 1``): one decode shared by two warpgroups of tokens.

Why: the register-A kernel (codegen/wgmma.py) decodes each weight once per ``BLOCK_M`` <= 256 tokens, because a
warpgroup's accumulators for 64 rows x 256 tokens already take 128 registers a thread; at 512 tokens every weight is
decoded twice, and on the H100 that second decode is what the MMAs do not hide (8192^2 M = 512: kernel 110 µs, its
MMAs alone 93.8, its decode alone 84; bench/NOTES.md, session 24). Here the A tile lives in shared memory, where both
warpgroups of the MMA partition read it, each multiplying its own half of up to 512 tokens, so each weight is decoded
once per 512 tokens. Decoding into shared memory with all 8 MMA warps would need E 2 (128 elements of a 64-row step
for 256 threads) and so 128 KB x tiles, one stage; a separate decode partition of 4 warps keeps E 1 and 64 KB tiles.

Partitions (``gl.warp_specialize``; Triton scopes each one's barriers to its own warps):

* MMA (the kernel's 8 warps, two warpgroups along the tokens): waits for step ``it``'s A and x tiles, issues
  the MMA, and once step ``it - 1``'s MMA has retired frees its A slot and refills its x slot; then stores the
  partial.
* decode (4 warps, the register-A kernel's 4-warp decode: 64 rows, ``64 E`` columns a step): fills its shared
  table, then decodes each step into a free slot of a ring of ``ASTAGES`` A tiles.
The MMA partition also brings x by TMA (two boxes of 256 tokens at 512) into a ring of ``STAGES`` slots, refilling a
slot once its MMA has retired, as the register-A kernel does: a third partition for it would cost a warpgroup of
registers (see :data:`WS_MAXNREG`).

The A tile's rows and columns are the register-A kernel's for 4 warps, so h is stored in the same wgmma order
(:func:`~qtip_triton.codegen.wgmma.wgmma_input_order`) and a program covers 64 output rows.
"""

from __future__ import annotations

from collections.abc import Callable

from qtip_triton.codegen.wgmma import WORD_OFFSETS, a_tile_lines, word_layout_src

WS_ROWS = 64  # output rows per program: the decode partition's 4 warps x 16
WS_ASTAGES = 3  # A tiles in the ring: two MMAs may read while the decode fills the third
WS_DECODE_WARPS = 4
# registers a thread at launch: 12 warps x 32 x 168 = 63 K of the SM's 64 K. ptxas compiles the whole kernel to this
# cap, and an m64n256k16 MMA with its 128 accumulators needs at least 154 (so no third, 1-warp TMA partition: it would
# take a whole warpgroup, and 16 warps leave 128 a thread)
WS_MAXNREG = 168
# the decode partition's registers after setmaxnreg; the MMA partition gets the rest: (12 x 32 x 168 - 128 x 152) / 256
# = 176 a thread, for its 128 accumulators
WS_DECODE_REGS = 152


def emit_ws_kernel(s, *, E: int, strided: bool = False, mode: str, rep: int, table_words: int | None,
                   loads: list[tuple[str, str]], decode: list[str], tree: str, wpf: int, half: int, decode_regs: int,
                   shared_helpers: Callable[[], list[str]]) -> None:
    """Append the three partitions and the kernel to ``s`` (the module header and the fp16 helpers are the caller's).

    ``decode``: the code's decode lines at loop depth (8 spaces), reading the word names of ``loads``; ``tree``: the
    join of the 16 packed states into [RB, CB, c, q1, q0, h]; ``shared_helpers``: the shared-table helper source."""
    if mode == "shared":
        s(*shared_helpers())
    args = ("x_smem, a_smem, a_ready, a_empty, x_ready, W, TBL, x_desc, Y, M, Rtot, Ctot, ITERS, stride_wq, "
            "stride_ys, stride_ym, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, ASTAGES: gl.constexpr, "
            "TSLOTS: gl.constexpr")
    _mma_partition(s, args, E, half)
    _decode_partition(s, args, E=E, strided=strided, mode=mode, rep=rep, table_words=table_words, loads=loads,
                      decode=decode, tree=tree, wpf=wpf)
    s("@gluon.jit",
      "def kernel(W, TBL, x_desc, Y, M, Rtot, Ctot, ITERS, stride_wq, stride_ys, stride_ym,",
      "           BLOCK_M: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr, TSLOTS: gl.constexpr = 0):")
    s.indent()
    s('"""Y[pid_k, m, rows] = partial Ŵ x[m] over this program\'s k range, 64 rows x BLOCK_M tokens: a decode partition',
      "writes A tiles to shared memory; the kernel's 8 warps bring x by TMA and multiply.",
      '"""',
      f"BK: gl.constexpr = 64 * {E}  # input columns per k step",
      f"ASTAGES: gl.constexpr = {WS_ASTAGES}  # A tiles in their ring",
      "# the x ring first and largest, at offset 0 of shared memory: a shared table sits in its last TSLOTS tiles",
      "x_smem = gl.allocate_shared_memory(gl.float16, [STAGES + TSLOTS, BLOCK_M, BK], x_desc.layout)",
      f"a_smem = gl.allocate_shared_memory(gl.float16, [ASTAGES, {WS_ROWS}, BK],",
      f"                                   gl.NVMMASharedLayout.get_default_for([{WS_ROWS}, BK], gl.float16))",
      "a_ready = gl.allocate_shared_memory(gl.int64, [ASTAGES, 1], mbarrier.MBarrierLayout())",
      "a_empty = gl.allocate_shared_memory(gl.int64, [ASTAGES, 1], mbarrier.MBarrierLayout())",
      "x_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())",
      "for i in gl.static_range(ASTAGES):",
      "    mbarrier.init(a_ready.index(i), count=1)",
      "    mbarrier.init(a_empty.index(i), count=1)",
      "for i in gl.static_range(STAGES):",
      "    mbarrier.init(x_ready.index(i), count=1)",
      "# each partition gets the same arguments, written out (a tuple bound to a name would turn the constexprs",
      "# into tensors)",
      "gl.warp_specialize([")
    for part in ("_mma_part", "_decode_part"):
        s(f"    ({part}, (x_smem, a_smem, a_ready, a_empty, x_ready, W, TBL, x_desc, Y, M, Rtot, Ctot, ITERS, stride_wq,",
          "              stride_ys, stride_ym, BLOCK_M, STAGES, ASTAGES, TSLOTS)),")
    s(f"], [{WS_DECODE_WARPS}], [{decode_regs}])")
    s.dedent()


def _mma_partition(s, args: str, E: int, half: int) -> None:
    s("@gluon.jit",
      f"def _mma_part({args}):")
    s.indent()
    s('"""Two warpgroups, each BLOCK_M / 2 tokens of the same 64 rows: A and x from shared memory, one MMA in flight',
      "past each wait; once a step's MMA has retired its A slot goes back to the decode partition (the arrive, by one",
      "thread, follows a barrier of this partition's warps, so both warpgroups have retired it) and its x slot takes",
      'the tile STAGES steps ahead, in boxes of at most 256 tokens (TMA\'s limit)."""',
      f"BK: gl.constexpr = 64 * {E}",
      "BOX: gl.constexpr = x_desc.block_type.shape[0]",
      "acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],",
      "                                                      instr_shape=[16, BLOCK_M // 2, 16])",
      "pid_r = gl.program_id(0)",
      "pid_k = gl.program_id(1)",
      "pid_m = gl.program_id(2)",
      "step0 = pid_k * ITERS",
      "for i in gl.static_range(STAGES):  # the first x tiles in flight",
      "    mbarrier.expect(x_ready.index(i), (BLOCK_M // BOX) * x_desc.block_type.nbytes, pred=i < ITERS)",
      "    for b in gl.static_range(BLOCK_M // BOX):",
      "        tma.async_copy_global_to_shared(x_desc, [pid_m * BLOCK_M + b * BOX, (step0 + i) * BK], x_ready.index(i),",
      "                                        x_smem.index(i).slice(b * BOX, BOX), pred=i < ITERS)",
      f"acc = gl.zeros([{WS_ROWS}, BLOCK_M], gl.float32, acc_layout)",
      "for it in range(ITERS):")
    s.indent()
    s("a_s = it % ASTAGES",
      "x_s = it % STAGES",
      "mbarrier.wait(a_ready.index(a_s), (it // ASTAGES) & 1)",
      "mbarrier.wait(x_ready.index(x_s), (it // STAGES) & 1)",
      "acc = warpgroup_mma(a_smem.index(a_s), x_smem.index(x_s).permute((1, 0)), acc, is_async=True)",
      "acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))",
      "# step it - 1 has retired: its A slot back to the decode, its x slot to the tile STAGES steps after it",
      "mbarrier.arrive(a_empty.index((it + ASTAGES - 1) % ASTAGES), count=1, pred=it > 0)",
      "done = it - 1",
      "nxt = done + STAGES",
      "ok = (done >= 0) & (nxt < ITERS)",
      "mbarrier.expect(x_ready.index(nxt % STAGES), (BLOCK_M // BOX) * x_desc.block_type.nbytes, pred=ok)",
      "for b in gl.static_range(BLOCK_M // BOX):",
      "    tma.async_copy_global_to_shared(x_desc, [pid_m * BLOCK_M + b * BOX, (step0 + nxt) * BK],",
      "                                    x_ready.index(nxt % STAGES), x_smem.index(nxt % STAGES).slice(b * BOX, BOX),",
      "                                    pred=ok)")
    s.dedent()
    s("acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))",
      f"orow = pid_r * {WS_ROWS} + gl.arange(0, {WS_ROWS}, layout=gl.SliceLayout(1, acc_layout))",
      "m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, acc_layout))",
      "mask = (orow < 2 * Rtot)[:, None] & (m < M)[None, :]",
      "gl.store(Y + pid_k * stride_ys + m[None, :] * stride_ym + orow[:, None], "
      + ("acc.to(gl.float16)" if half else "acc") + ", mask=mask)")
    s.dedent()
    s("", "")


def _decode_partition(s, args: str, *, E: int, strided: bool, mode: str, rep: int, table_words: int | None,
                      loads: list[tuple[str, str]], decode: list[str], tree: str, wpf: int) -> None:
    s("@gluon.jit",
      f"def _decode_part({args}):")
    s.indent()
    s('"""4 warps: 32 word rows (64 output rows) x 4 E word columns a step, decoded as the register-A kernel\'s 4-warp',
      'decode and stored as one A tile into a free slot of the ring."""',
      f"RB: gl.constexpr = 8 * {WS_DECODE_WARPS}  # word rows per program",
      f"CB: gl.constexpr = 4 * {E}  # word columns per k step",
      f"BK: gl.constexpr = 64 * {E}  # input columns per k step",
      f"word_layout: gl.constexpr = {word_layout_src(E, WS_DECODE_WARPS, strided)}",
      "pid_r = gl.program_id(0)",
      "pid_k = gl.program_id(1)",
      *WORD_OFFSETS)
    tl = f"gl.BlockedLayout([1], [32], [{WS_DECODE_WARPS}], [0])"
    if table_words is not None:
        s(f"tbl = gl.load(TBL + gl.arange(0, {table_words}, layout={tl}))")
    if mode == "shared":
        s(f"# the code table ({rep} lane-interleaved copies), written once into the x ring's last TSLOTS tiles (the",
          "# ring is the kernel's first allocation, at offset 0; the launcher checks it); the fill's barrier is this",
          "# partition's",
          "INTERPRET: gl.constexpr = False",
          "toff = STAGES * BLOCK_M * BK * 2  # byte offset of the table",
          f"_fill_table(tbl, gl.arange(0, {table_words}, layout={tl}), {rep}, toff)",
          "sbase = _smem_base(w_off) + toff",
          f"lcopy = _lane_copy(w_off, {rep})")
    for name, off in loads:
        s(f"{name} = gl.load(W + {off}).to(gl.uint32, bitcast=True)  # step 0's words")
    s("for it in range(ITERS):")
    s.indent()
    if wpf:
        for name, off in loads:
            s(f"{name}_n = gl.load(W + {off} + CB, mask=it + 1 < ITERS, other=0)  # step it + 1's words, ahead")
    s.lines.extend(decode)
    s(*a_tile_lines("a", tree, WS_DECODE_WARPS, E, strided),
      "a_s = it % ASTAGES",
      "mbarrier.wait(a_empty.index(a_s), ((it // ASTAGES) & 1) ^ 1)  # its MMA of ASTAGES steps ago has retired",
      "a_smem.index(a_s).store(a)",
      "fence_async_shared()  # the generic-proxy stores, before the MMA's async-proxy reads",
      "mbarrier.arrive(a_ready.index(a_s), count=1)")
    for name, off in loads:
        if wpf:
            s(f"{name} = {name}_n.to(gl.uint32, bitcast=True)")
        else:
            s(f"{name} = gl.load(W + {off} + CB, mask=it + 1 < ITERS, other=0).to(gl.uint32, bitcast=True)")
    s("w_off += CB",
      "n_off += CB")
    s.dedent()
    s.dedent()
    s("", "")
