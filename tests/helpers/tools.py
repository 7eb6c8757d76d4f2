"""Tool definitions the tool-calling tests share (OpenAI's function format)."""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
# A function with no parameters: it can only be called with exactly {}.
TIME = {"type": "function", "function": {"name": "now", "description": "The time", "parameters": {}}}
