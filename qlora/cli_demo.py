"""Streaming terminal chat with a ChatGLM2/3 model (merged QLoRA output, GLM layout or a THUDM folder).

    python qlora/cli_demo.py --model_path models/chatglm3-merged [--bits 4|8] [--fp16]

Type a message; `clear` starts a new conversation, `exit` quits. Ctrl-C while an answer streams stops that
answer and keeps the program (and the conversation so far); Ctrl-C at the prompt quits.
"""
import argparse
import sys

import common

WELCOME = "ChatGLM chat. Type a message; 'clear' starts over, 'exit' quits; Ctrl-C stops an answer."


def answer(model, tokenizer, generation, query, history, max_new_tokens, out=sys.stdout) -> str:
    """Stream one answer to `out`; returns what was said (partial when interrupted)."""
    said = []
    out.write("ChatGLM: ")
    out.flush()
    try:
        for chunk in common.stream_chat(model, tokenizer, generation, query, history, max_new_tokens):
            said.append(chunk)
            out.write(chunk)
            out.flush()
    except KeyboardInterrupt:
        out.write(" [stopped]")
    out.write("\n")
    out.flush()
    return "".join(said).strip()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, help="model folder")
    parser.add_argument("--bits", type=int, default=16, choices=[4, 8, 16], help="load quantized (bitsandbytes)")
    parser.add_argument("--fp16", action="store_true", help="load in float16 (GPU)")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="longest answer")
    args = parser.parse_args(argv)
    generation = common.model_generation(args.model_path)
    tokenizer = common.load_tokenizer(args.model_path)
    model = common.load_model(args.model_path, args.bits, args.fp16)
    history = []
    print(WELCOME, flush=True)
    while True:
        try:
            query = input("\n用户: ").strip()
        except (KeyboardInterrupt, EOFError):
            print()
            break
        if query == "exit":
            break
        if query == "clear":
            history = []
            print("(conversation cleared)", flush=True)
            continue
        if query:
            history.append((query, answer(model, tokenizer, generation, query, history, args.max_new_tokens)))


if __name__ == "__main__":
    main()
