"""The Gradio page's side of the headless-Chromium check (tools/chat_screenshot.py drives the browser)."""
import json

from tools.chat_screenshot import chat_screenshot as _chat_screenshot

SEND = """(() => {
  const box = document.querySelector('textarea');
  if (!box) return false;
  const setter = Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value').set;
  setter.call(box, %s);
  box.dispatchEvent(new Event('input', {bubbles: true}));
  const send = document.querySelector('button.submit-button');
  if (!send) return false;
  setTimeout(() => send.click(), 300);  // after the input event has reached the component
  return true;
})()"""
BOT_TEXT = """Array.from(document.querySelectorAll('.bot, [data-testid="bot"], .message.bot'))
  .map(e => e.innerText).join('\\n')"""


def chat_screenshot(chromium: str, url: str, message: str, png_path, profile) -> tuple:
    """(png path, page text) after sending `message` on the Gradio chat and seeing the bot's answer."""
    return _chat_screenshot(chromium, url, SEND % json.dumps(message), BOT_TEXT, png_path, profile)
