import osless

app = osless.App("logger")


@app.function()
def say(event, ctx):
    print(f"said {event['word']}", flush=True)
    return {"said": event["word"]}
