// burrow console: a convenience only. Every page reads and every action
// works without this script.
document.addEventListener("DOMContentLoaded", () => {
  // "Select all" in the dead-letter table.
  const all = document.querySelector("input[data-select-all]");
  if (all) {
    all.addEventListener("change", () => {
      document.querySelectorAll("input[name=ids]").forEach((box) => {
        box.checked = all.checked;
      });
    });
  }
});
