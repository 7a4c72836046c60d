"""glm-tune's library: what the commands at the repository root import.

    glm_tune/             errors, console, safe_output, glm_family, model_loading, generation, sampling, scaled_rotary
    glm_tune/training/    the Trainer with generation metrics, a run's checkpoints, CPU tensor-parallel stand-ins
    glm_tune/conversion/  checkpoint layouts (Hugging Face, Paddle, transformers' GLM), safetensors, shard merging
    glm_tune/deployment/  the predictor template, the exported step graph and the engines that run it
    glm_tune/serving/     the OpenAI-compatible server: request rules, continuous batching, streamed text, routes

Imports only go downward (commands -> glm_tune -> data.py / utils.py), never back to a command.
"""
