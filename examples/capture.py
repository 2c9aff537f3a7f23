"""Capture the residual stream of the embedded GPT-2 and check it adds up exactly."""

import reslens

model, tokenizer = reslens.load_model()  # the small GPT-2 shipped in the package, offline
batch = reslens.tokenize(tokenizer, ["It was a dark and stormy night;", "The cat sat"], padding_side="left")
res = reslens.capture(model, batch, sites=("resid", "attn_out", "mlp_out", "logits"))

print("resid", tuple(res.resid.shape))  # [n_layer + 1, batch, pos, d_model]
for layer in range(reslens.adapter(model).n_layer):
    step = res.resid[layer + 1] - res.resid[layer] - res.attn_out[layer] - res.mlp_out[layer]
    print(f"block {layer}: |resid[l+1] - resid[l] - attn_out - mlp_out| max = {step.abs().max():.1e}")
res.save("residuals.safetensors")  # reload with reslens.Residuals.load(...)
