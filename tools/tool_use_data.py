"""Synthetic ChatGLM3 tool-use conversations (weather, calculator, unit conversion; Chinese and English prompts)
whose right call and arguments follow from the prompt, for `tools/make_demo_data.py --kind tools`.

Each record is THUDM's `conversations` format: the three tools, the user's question, the `tool` call with its
observation, and the final answer that uses the observation; about one record in seven is small talk answered
without a tool, so a model also learns when not to call one. Weather calls are three records in seven.
"""
import random

TOOLS = [  # short descriptions: the tools' system message is part of every prompt
    {"name": "get_weather", "description": "城市天气 / weather", "parameters": {"city": "string"}},
    {"name": "calculator", "description": "四则运算 / arithmetic",
     "parameters": {"a": "number", "b": "number", "op": "add|sub|mul|div"}},
    {"name": "convert_unit", "description": "单位换算 / unit conversion",
     "parameters": {"value": "number", "from_unit": "string", "to_unit": "string"}},
]

# Many cities, each in several templates: with few of them a small model learns template -> city instead of
# copying the name out of the prompt (measured: 22 cities, every dev weather call named a training city).
CITIES_ZH = ["北京", "上海", "广州", "深圳", "杭州", "成都", "武汉", "西安", "南京", "重庆", "天津", "苏州", "长沙", "郑州",
             "青岛", "大连", "厦门", "宁波", "无锡", "合肥", "福州", "济南", "昆明", "贵阳", "南宁", "海口", "三亚", "拉萨",
             "兰州", "银川", "西宁", "太原", "石家庄", "沈阳", "长春", "哈尔滨", "呼和浩特", "乌鲁木齐", "南昌", "温州",
             "佛山", "东莞", "珠海", "汕头", "桂林", "洛阳", "开封", "扬州", "徐州", "烟台", "威海", "潍坊", "绍兴", "嘉兴",
             "金华", "台州", "泉州", "漳州", "丽江", "大理", "遵义", "绵阳", "宜昌", "襄阳", "岳阳", "常德", "株洲", "赣州",
             "九江", "芜湖", "蚌埠", "淮安", "盐城", "镇江", "常州", "南通", "保定", "唐山", "秦皇岛", "邯郸"]
CITIES_EN = ["Beijing", "Shanghai", "London", "Paris", "Tokyo", "Berlin", "Sydney", "Toronto", "Madrid", "Seoul",
             "Rome", "Vienna", "Prague", "Dublin", "Oslo", "Lisbon", "Athens", "Warsaw", "Zurich", "Geneva", "Munich",
             "Milan", "Boston", "Chicago", "Denver", "Dallas", "Austin", "Seattle", "Miami", "Atlanta", "Houston",
             "Phoenix", "Portland", "Vancouver", "Montreal", "Ottawa", "Calgary", "Lima", "Bogota", "Santiago",
             "Havana", "Cairo", "Nairobi", "Lagos", "Accra", "Dubai", "Doha", "Mumbai", "Delhi", "Chennai", "Dhaka",
             "Bangkok", "Hanoi", "Manila", "Jakarta", "Singapore", "Osaka", "Kyoto", "Busan", "Taipei", "Perth",
             "Auckland", "Wellington", "Helsinki", "Stockholm", "Copenhagen", "Brussels", "Amsterdam", "Hamburg",
             "Budapest", "Istanbul", "Moscow", "Kiev", "Riga", "Tallinn", "Edinburgh", "Glasgow", "Manchester"]
CONDITIONS = [("晴", "sunny"), ("多云", "cloudy"), ("小雨", "rainy"), ("阴", "overcast")]
WEATHER_ZH = ["{city}今天天气怎么样？", "查一下{city}的天气", "{city}现在冷不冷？", "{city}下雨了吗？", "我要去{city}，天气如何？"]
WEATHER_EN = ["What's the weather in {city}?", "How is the weather in {city} today?", "Is it raining in {city}?",
              "I am flying to {city}, what is the weather like?"]
OPS = {"add": ("加", "plus", lambda a, b: a + b), "sub": ("减", "minus", lambda a, b: a - b),
       "mul": ("乘以", "times", lambda a, b: a * b), "div": ("除以", "divided by", lambda a, b: round(a / b, 2))}
MATH_ZH = ["{a}{op}{b}等于多少？", "帮我算一下{a}{op}{b}"]
MATH_EN = ["What is {a} {op} {b}?", "Compute {a} {op} {b}."]
UNITS = [("km", "mile", 0.621, "公里", "英里"), ("kg", "lb", 2.205, "公斤", "磅"), ("m", "ft", 3.281, "米", "英尺")]
CONVERT_ZH = ["{value}{zh_from}是多少{zh_to}？", "把{value}{zh_from}换算成{zh_to}"]
CONVERT_EN = ["How many {to} is {value} {frm}?", "Convert {value} {frm} to {to}."]
SMALL_TALK = [("你好", "你好！有什么可以帮你？"), ("谢谢", "不客气！"), ("你是谁？", "我是一个可以查天气、算数和换算单位的助手。"),
              ("Hello", "Hello! How can I help you?"), ("Thank you", "You are welcome!"),
              ("Who are you?", "I am an assistant that can check the weather, calculate and convert units.")]


def weather_of(city: str, english: bool) -> dict:
    """The demo's weather service: made up, but the same city always gets the same weather."""
    seed = sum(ord(c) for c in city)
    condition = CONDITIONS[seed % len(CONDITIONS)]
    return {"city": city, "temperature": seed % 40 - 5, "condition": condition[english]}


def run_tool(name: str, arguments: dict):
    """What the demo's client runs for a tool call the model made (the server never runs anything)."""
    if name == "get_weather":
        return weather_of(str(arguments["city"]), str(arguments["city"]).isascii())
    if name == "calculator":
        return {"result": OPS[arguments["op"]][2](arguments["a"], arguments["b"])}
    if name == "convert_unit":
        factor = next(u[2] for u in UNITS if (u[0], u[1]) == (arguments["from_unit"], arguments["to_unit"]))
        return {"value": round(arguments["value"] * factor, 2), "unit": arguments["to_unit"]}
    raise KeyError(f"no tool {name!r}")


def tool_record(rng: random.Random) -> dict:
    """One conversation; its user prompt is unique enough to keep dev prompts out of train."""
    # weather weighs most: copying a name out of the prompt is what a small model learns last
    kind = rng.choice(["weather", "weather", "weather", "math", "math", "convert", "chat"])
    english = rng.random() < 0.5
    if kind == "chat":
        question, answer = rng.choice([p for p in SMALL_TALK if (p[0].isascii()) == english] or SMALL_TALK)
        return {"tools": TOOLS, "conversations": [{"role": "user", "content": question},
                                                  {"role": "assistant", "content": answer}]}
    if kind == "weather":
        city = rng.choice(CITIES_EN if english else CITIES_ZH)
        question = rng.choice(WEATHER_EN if english else WEATHER_ZH).format(city=city)
        call, arguments = "get_weather", {"city": city}
        observation = run_tool(call, arguments)
        temperature, condition = observation["temperature"], observation["condition"]
        answer = (f"It is {condition} in {city}, {temperature}°C." if english
                  else f"{city}今天{condition}，气温{temperature}度。")
    elif kind == "math":
        op = rng.choice(sorted(OPS))
        a, b = rng.randint(1, 99), rng.randint(1, 20)
        zh, en, _ = OPS[op]
        question = rng.choice(MATH_EN if english else MATH_ZH).format(a=a, b=b, op=en if english else zh)
        call, arguments = "calculator", {"a": a, "b": b, "op": op}
        observation = run_tool(call, arguments)
        result = observation["result"]
        answer = f"The result is {result}." if english else f"结果是{result}。"
    else:
        frm, to, _, zh_from, zh_to = rng.choice(UNITS)
        value = rng.randint(1, 99)
        template = rng.choice(CONVERT_EN if english else CONVERT_ZH)
        question = template.format(value=value, frm=frm, to=to, zh_from=zh_from, zh_to=zh_to)
        call, arguments = "convert_unit", {"value": value, "from_unit": frm, "to_unit": to}
        observation = run_tool(call, arguments)
        result = observation["value"]
        answer = f"{value} {frm} is about {result} {to}." if english else f"{value}{zh_from}约等于{result}{zh_to}。"
    return {"tools": TOOLS, "conversations": [
        {"role": "user", "content": question},
        {"role": "tool", "name": call, "parameters": arguments, "observation": observation},
        {"role": "assistant", "content": answer}]}


def prompt_of(record: dict):
    """The prompt that must not repeat between train and dev; None for small talk, which repeats by nature (it
    stays in train only)."""
    if len(record["conversations"]) == 2:
        return None
    return record["conversations"][0]["content"]
