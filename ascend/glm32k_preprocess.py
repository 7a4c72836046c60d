"""LongBench -> AdvertiseGen shape for the GLM3-32K recipe (the main suite's converter, under the recipe's name).

    python ascend/glm32k_preprocess.py --input_dir LongBench/data --prompt_config dataset2prompt.json \
        --output_file longbench.json [--datasets qmsum,vcsum]
"""

from tools.longbench_to_adgen import main

if __name__ == "__main__":
    main()
