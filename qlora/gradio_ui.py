"""Streaming web chat (Gradio) with a ChatGLM2/3 model; binds loopback unless told otherwise.

    python qlora/gradio_ui.py --model_path models/chatglm3-merged [--host 127.0.0.1 --port 7860] [--bits 4]

Answers appear as they are generated (typing effect), the conversation is kept as history, and the clear
button starts over. The streaming endpoint is also an API: gradio_client.Client(url).submit(msg, api_name="/chat").
"""
import argparse

import common


def history_pairs(messages) -> list:
    """Gradio's [{"role", "content"}, ...] history as the (question, answer) pairs the prompt formats take."""
    pairs, question = [], None
    for message in messages or []:
        content = message["content"] if isinstance(message, dict) else message
        role = message.get("role") if isinstance(message, dict) else None
        if isinstance(content, list):  # gradio 6 may send content parts
            content = "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
        if role == "user":
            question = content
        elif role == "assistant" and question is not None:
            pairs.append((question, content))
            question = None
    return pairs


def build_app(model, tokenizer, generation, max_new_tokens=256):
    import gradio as gr

    def respond(message, history):
        partial = ""
        for chunk in common.stream_chat(model, tokenizer, generation, message, history_pairs(history),
                                        max_new_tokens):
            partial += chunk
            yield partial

    chatbot = gr.Chatbot(label="ChatGLM", height=420)
    return gr.ChatInterface(respond, chatbot=chatbot, title="ChatGLM (glm-tune)", api_name="chat")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, help="model folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    parser.add_argument("--port", type=int, default=7860, help="port")
    parser.add_argument("--bits", type=int, default=16, choices=[4, 8, 16], help="load quantized (bitsandbytes)")
    parser.add_argument("--fp16", action="store_true", help="load in float16 (GPU)")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="longest answer")
    args = parser.parse_args(argv)
    generation = common.model_generation(args.model_path)
    app = build_app(common.load_model(args.model_path, args.bits, args.fp16), common.load_tokenizer(args.model_path),
                    generation, args.max_new_tokens)
    app.queue().launch(server_name=args.host, server_port=args.port, share=False)


if __name__ == "__main__":
    main()
