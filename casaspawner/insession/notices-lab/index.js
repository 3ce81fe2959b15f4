// casaspawner-notices: the CASA operators' notices as JupyterLab notifications.
//
// casaspawner's Jupyter server extension (casaspawner.insession.notices) fetches this session's
// notices from the hub's casa-sessions service. This plugin reads the current ones when JupyterLab opens
// (GET <base_url>casa-notices/api) and then listens to the server's event stream, on which the extension
// sends every change. Each notice's title stays on screen as a warning until it is dismissed or goes away;
// its "Details" button opens the notice file, which has the full text.
//
// No imports: the application object brings the command registry (JupyterLab's own apputils:notify and
// apputils:dismiss-notification commands) and the service manager (server settings, event stream), so the
// bundle carries no JupyterLab code. Rebuild with `make hub-labextension` after changing this file.

const SCHEMA = 'https://casaspawner.io/events/session-notices';

const plugin = {
  id: 'casaspawner-notices:plugin',
  description: "Shows the CASA operators' notices (drained release, upcoming idle cull) as notifications.",
  autoStart: true,
  activate: app => {
    const shown = new Map(); // notice (kind and text) -> promise of its notification id
    let pushed = false; // an event arrived: it is newer than the answer to the first request

    const show = (notices, file) => {
      const wanted = new Map(notices.map(notice => [`${notice.kind}\n${notice.text}`, notice]));
      for (const [key, id] of shown) {
        if (!wanted.has(key)) {
          shown.delete(key);
          id.then(value => app.commands.execute('apputils:dismiss-notification', { id: value }));
        }
      }
      for (const [key, notice] of wanted) {
        if (!shown.has(key)) {
          const actions = file
            ? [{ label: 'Details', commandId: 'docmanager:open', args: { path: file, factory: 'Markdown Preview' } }]
            : [];
          const options = { autoClose: false, actions, data: { casaspawner: notice.kind } };
          const message = notice.title || notice.text;
          shown.set(key, app.commands.execute('apputils:notify', { message, type: 'warning', options }));
        }
      }
    };

    app.restored.then(() => {
      app.serviceManager.events.stream.connect((_, event) => {
        if (event.schema_id === SCHEMA && Array.isArray(event.notices)) {
          pushed = true;
          show(event.notices, event.file);
        }
      });
      const settings = app.serviceManager.serverSettings;
      const headers = settings.token ? { Authorization: `token ${settings.token}` } : {};
      return fetch(`${settings.baseUrl}casa-notices/api`, { credentials: 'same-origin', headers, cache: 'no-store' })
        .then(response => (response.ok ? response.json() : { notices: [] }))
        .then(body => {
          if (!pushed) {
            show(Array.isArray(body.notices) ? body.notices : [], body.file);
          }
        });
    }).catch(error => console.warn('casaspawner-notices: the notices could not be read', error));
  }
};

export default plugin;
