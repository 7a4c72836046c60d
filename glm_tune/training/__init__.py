"""Fine-tuning: PaddleNLP's Trainer with generation metrics, a run's checkpoints, tensor parallel on CPU."""
