// The Script menu under the generation settings of the txt2img and img2img tabs (A1111's "Script" dropdown): the
// registry's scripts from /internal/scripts, each with its controls, sent as script_name / script_args with the
// tab's request (through app.js's payloadExtensions).
"use strict";

const scriptMenu = {};  // tab -> the tab's scripts [{name, title, args: [{label, value, kind, ...}]}]

const slug = (name) => name.replace(/[^a-z0-9]+/gi, "_").toLowerCase();

// One argument's control; `read()` gives the value A1111's positional script_args hold for it.
function scriptArgControl(id, arg) {
  const wrap = document.createElement("label");
  const caption = document.createTextNode(arg.label);
  let input;
  if (arg.kind === "html") {
    const note = document.createElement("p");
    note.className = "note";
    note.textContent = arg.label;
    return { element: note, read: () => arg.value };
  }
  if (arg.kind === "list") return { element: null, read: () => null };  // the page sends values as text instead
  if (arg.kind === "checkbox") {
    wrap.className = "check";
    input = document.createElement("input");
    input.type = "checkbox";
    input.checked = Boolean(arg.value);
    input.id = id;
    wrap.append(input, caption);
    return { element: wrap, read: () => input.checked };
  }
  wrap.append(caption);
  if (arg.choices) {
    input = document.createElement("select");
    for (const choice of arg.choices) input.add(new Option(choice, choice, false, choice === arg.value));
  } else if (arg.kind === "number") {
    wrap.className = "slider";
    const range = document.createElement("input");
    range.type = "range";
    input = document.createElement("input");
    input.type = "number";
    for (const element of [range, input]) {
      Object.assign(element, { min: arg.minimum, max: arg.maximum, step: arg.step, value: arg.value });
    }
    range.addEventListener("input", () => { input.value = range.value; });
    input.addEventListener("input", () => { range.value = input.value; });
    wrap.append(range);
    input.id = id;
    wrap.append(input);
    return { element: wrap, read: () => Number(input.value) };
  } else {
    input = document.createElement(arg.kind === "textarea" ? "textarea" : "input");
    if (arg.kind === "textarea") input.rows = 4;
    input.value = arg.value ?? "";
  }
  input.id = id;
  wrap.append(input);
  return { element: wrap, read: () => input.value };
}

function buildScriptMenu(tab, scripts) {
  const container = $(`${tab}_script_container`);
  const select = document.createElement("select");
  select.id = `${tab}_script_list`;
  select.add(new Option("None", ""));
  const label = document.createElement("label");
  label.append("Script", select);
  container.append(label);
  scriptMenu[tab] = scripts.map((script) => {
    select.add(new Option(script.title, script.name));
    const box = document.createElement("div");
    box.className = "script-args";
    box.id = `${tab}_script_${slug(script.name)}`;
    box.hidden = true;
    const controls = script.args.map((arg, i) => scriptArgControl(`${box.id}_${i}`, arg));
    for (const control of controls) if (control.element) box.append(control.element);
    container.append(box);
    return { script, box, controls };
  });
  select.addEventListener("change", () => {
    for (const entry of scriptMenu[tab]) entry.box.hidden = entry.script.name !== select.value;
  });
}

payloadExtensions.push((tab, payload) => {
  const chosen = $(`${tab}_script_list`);
  const entry = chosen && (scriptMenu[tab] || []).find((e) => e.script.name === chosen.value);
  if (!entry) return;
  payload.script_name = entry.script.name;
  payload.script_args = entry.controls.map((control) => control.read());
});

(async () => {
  const scripts = await api("GET", "/internal/scripts");
  for (const tab of ["txt2img", "img2img"]) buildScriptMenu(tab, scripts[tab]);
  document.body.dataset.scriptsReady = "true";
})().catch((error) => showSettingStatus(`The Script menu could not load: ${error.message}`, true));
