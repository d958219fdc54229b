"""The one weather tool and conversation the function-calling tests teach tiny models (ChatGLM3 and GLM-4 alike)."""

from __future__ import annotations

WEATHER = {"name": "get_weather", "description": "查询城市的天气",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TOOLS = [{"type": "function", "function": WEATHER}]
CALL_QUERY = "北京天气怎么样？"
ARGUMENTS = {"city": "北京"}
RESULT = '{"temperature": 20}'
AFTER_RESULT = "北京现在二十度。"
GREETING = ("你好", "你好！我是人工智能助手。")
