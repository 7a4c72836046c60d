"""glm-tune's library: what the commands at the repository root import.

    glm_tune/             errors, console, safe_output, glm_family, model_loading, generation, sampling, metrics,
                          scaled_rotary
    glm_tune/data/        examples, record readers, ChatGLM3 tool calls, prompt formats, the collator
    glm_tune/training/    the Trainer with generation metrics, a run's checkpoints, CPU tensor-parallel stand-ins
    glm_tune/conversion/  checkpoint layouts (Hugging Face, Paddle, transformers' GLM), safetensors, shard merging
    glm_tune/deployment/  the export format, the step graph and its engines, the scheduler infer and serve share
                          (continuous batching, speculative steps, the prefix cache), the predictors
    glm_tune/serving/     the OpenAI-compatible server: request rules, continuous batching, streamed text, routes

Imports only go downward: commands -> the root's data.py / utils.py / argument.py -> glm_tune; nothing in
glm_tune imports a root module, and its packages import one another without a loop (tests/test_layout.py).
"""
