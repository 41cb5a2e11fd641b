// The Styles menu of the txt2img and img2img tabs (A1111's "Styles" dropdown): choose saved styles from the server's
// styles.csv (GET /sdapi/v1/prompt-styles), which generation merges into the prompts; save the current prompts as a
// new style, or delete the chosen ones (/internal/styles, written to styles.csv by the server).
"use strict";

const styleTabs = ["txt2img", "img2img"];

// app.js's commonPayload sends these names as the request's `styles`.
function selectedStyles(tab) {
  const select = $(`${tab}_styles`);
  return select ? Array.from(select.selectedOptions, (option) => option.value) : [];
}

function showStyles(styles) {
  for (const tab of styleTabs) {
    const select = $(`${tab}_styles`);
    const chosen = new Set(selectedStyles(tab));
    select.replaceChildren(...styles.map((style) => {
      const option = new Option(style.name, style.name, false, chosen.has(style.name));
      option.title = [style.prompt, style.negative_prompt && `Negative: ${style.negative_prompt}`]
        .filter(Boolean).join("\n");
      return option;
    }));
  }
}

function styleStatus(tab, text, isError) {
  const status = $(`${tab}_styles_status`);
  status.textContent = text;
  status.classList.toggle("error", Boolean(isError));
}

async function saveStyle(tab) {
  const name = $(`${tab}_style_name`).value.trim();
  if (!name) { styleStatus(tab, "Type a name for the new style first", true); return; }
  try {
    showStyles(await api("POST", "/internal/styles", {
      name, prompt: $(`${tab}_prompt`).value, negative_prompt: $(`${tab}_neg_prompt`).value.trim(),
    }));
    $(`${tab}_style_name`).value = "";
    styleStatus(tab, `Saved style ${name}`);
  } catch (error) { styleStatus(tab, error.message, true); }
}

async function deleteStyles(tab) {
  const names = selectedStyles(tab);
  if (!names.length) { styleStatus(tab, "Choose the styles to delete first", true); return; }
  try {
    let styles = [];
    for (const name of names) styles = await api("POST", "/internal/styles/delete", { name });
    showStyles(styles);
    styleStatus(tab, `Deleted ${names.join(", ")}`);
  } catch (error) { styleStatus(tab, error.message, true); }
}

function buildStylesMenu(tab) {
  const block = document.createElement("div");
  block.className = "styles-menu";
  block.innerHTML = `
    <label>Styles <select id="${tab}_styles" multiple size="3"></select></label>
    <span class="row"><input type="text" id="${tab}_style_name" placeholder="New style name">
      <button id="${tab}_style_create" class="tool" title="Save the prompts as a style">Save</button>
      <button id="${tab}_style_delete" class="tool" title="Delete the chosen styles">Delete</button></span>
    <span id="${tab}_styles_status" class="status"></span>`;
  $(`tab_${tab}`).querySelector(".actions").appendChild(block);
  $(`${tab}_style_create`).addEventListener("click", () => saveStyle(tab));
  $(`${tab}_style_delete`).addEventListener("click", () => deleteStyles(tab));
}

styleTabs.forEach(buildStylesMenu);  // app.js has built the tabs synchronously before this script runs
api("GET", "/sdapi/v1/prompt-styles").then(showStyles)
  .catch((error) => styleTabs.forEach((tab) => styleStatus(tab, error.message, true)));
