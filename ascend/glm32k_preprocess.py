"""LongBench -> AdvertiseGen shape for the GLM3-32K recipe (the main suite's converter, under the recipe's name).

    python ascend/glm32k_preprocess.py --input_dir LongBench/data --prompt_config dataset2prompt.json \
        --output_file longbench.json [--datasets qmsum,vcsum]
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.longbench_to_adgen import main  # noqa: E402

if __name__ == "__main__":
    main()
