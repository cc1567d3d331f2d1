// PM2: Blazz's four whatsapp-service processes and wa-router in front of them, in one
// ecosystem file. Merge the `wa-router` entry (and the LARAVEL_URL change) into yours.
//
//   pm2 start deploy/pm2/ecosystem.config.js && pm2 save
//   pm2 sendSignal SIGHUP wa-router     # reload the router's config (no restart)
//   pm2 restart wa-router               # a restart: in-flight requests finish first
//   pm2 logs wa-router                  # one JSON object per line
//
// The router is a Python program in its own venv (deploy/README.md, "PM2"): PM2 only runs
// it (interpreter 'none'). PM2 stops a process with SIGINT, which the router treats as
// SIGTERM, and SIGKILLs it after kill_timeout: keep that above server.shutdown_grace_s.
// Check the router's config before starting or reloading it:
//   /opt/wa-router/venv/bin/wa-router check-config /etc/wa-router/router.yaml

const WHATSAPP_SERVICE_DIR = process.env.WHATSAPP_SERVICE_DIR || '/var/www/blazz/whatsapp-service';
const ROUTER_URL = process.env.WA_ROUTER_URL || 'http://127.0.0.1:8080';

// One Node process per port, as Blazz runs them. LARAVEL_URL is the router: it verifies
// their webhooks, learns from them which instance holds which session, and relays them to
// Laravel (webhooks.laravel_url in the router's config); Node's other calls to Laravel
// pass through it unchanged.
const nodeInstance = (n) => ({
  name: `whatsapp-instance-${n}`,
  cwd: WHATSAPP_SERVICE_DIR,
  script: 'server.js',
  exec_mode: 'fork',
  instances: 1,
  autorestart: true,
  watch: false,
  max_memory_restart: '1G',
  kill_timeout: 10000,
  env: {
    NODE_ENV: 'production',
    PORT: 3000 + n,
    INSTANCE_ID: `whatsapp-instance-${n}`,
    LARAVEL_URL: ROUTER_URL,
  },
});

module.exports = {
  apps: [
    nodeInstance(1),
    nodeInstance(2),
    nodeInstance(3),
    nodeInstance(4),
    {
      name: 'wa-router',
      cwd: '/var/lib/wa-router',
      script: '/opt/wa-router/venv/bin/wa-router',
      args: ['serve', '-c', '/etc/wa-router/router.yaml'],
      interpreter: 'none',
      exec_mode: 'fork',
      instances: 1, // for more processes: args '--workers N' (they share the port)
      autorestart: true,
      watch: false,
      // Exit 2 is a config error or a port in use: restarting will not fix it.
      stop_exit_codes: [0, 2],
      min_uptime: '5s',
      max_restarts: 10,
      restart_delay: 2000,
      kill_timeout: 30000, // ms; above server.shutdown_grace_s (15 s)
      merge_logs: true,
      env: {
        WA_ROUTER_STATE__DIR: '/var/lib/wa-router',
        WA_ROUTER_LOG__FORMAT: 'json',
        PYTHONUNBUFFERED: '1',
      },
    },
  ],
};
