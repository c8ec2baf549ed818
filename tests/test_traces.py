"""experiments.traces: XLA kernels are attributed to dsjax name scopes through the compiled HLO (the route that
still works when CUDA command buffers hide the scopes from a profiler trace)."""

import jax
import jax.numpy as jnp

from experiments.traces import is_kernel_stream, kernel_op_names, scope_of


def test_kernel_names_lead_to_op_names_and_scopes():
    hlo = ('  %loop_add_fusion.9 = (f32[11,64]{1,0}) fusion(%a, %b), kind=kLoop, calls=%fused_add.9, '
           'metadata={op_name="jit(train_step)/cond/branch_1_fun/optimizer/add" deduplicated_name="x"}\n'
           '  ROOT %gemm_fusion_dot_general.64 = bf16[8,8]{1,0} fusion(%c), kind=kCustom, metadata={op_name='
           '"jit(train_step)/transpose(jvp(ce_loss))/while/body/dot_general"}\n'
           '  %param.1 = f32[2]{0} parameter(0)\n')
    names = kernel_op_names(hlo)
    assert scope_of(names["loop_add_fusion_9"]) == "optimizer (fwd)"
    assert scope_of(names["gemm_fusion_dot_general_64"]) == "ce_loss (bwd)"
    assert "param_1" not in names and scope_of("cudnn_generated_fort_native_sdpa") == "other (fwd)"


def test_a_compiled_module_maps_its_fusions_to_the_jax_name_stack():
    def f(x):
        with jax.named_scope("router"):
            return jnp.sum(jnp.tanh(x) * 2 + 1)

    text = jax.jit(jax.grad(f)).lower(jnp.ones((64, 64))).compile().as_text()
    names = kernel_op_names(text)
    assert names and any(scope_of(v).startswith("router") for v in names.values())


def test_kernel_streams_are_told_from_copy_streams():
    """jax 0.11 traces name a stream after all it carries; the compute stream also lists its copies."""
    assert is_kernel_stream("Stream #14(Memset,MemcpyD2D,Compute,MemcpyD2H)")
    assert is_kernel_stream("Stream #7")
    assert not is_kernel_stream("Stream #72(MemcpyD2D)")
    assert not is_kernel_stream("XLA Ops")
